"""The CPU demo presets: a tiny LLaDA warmed up from scratch, then RL; the comparison objectives run."""
import json
import math

import pytest

from bgpo.train import Trainer, load_config


@pytest.mark.parametrize("objective", ["vrpo", "diffu_grpo"])
def test_demo_preset_runs_with_the_comparison_objectives(tmp_path, objective):
    config = load_config(preset="tiny-sudoku", overrides=[
        f"policy.objective={objective}", "sft.steps=5", "sft.batch_size=16", "steps=2", "batch_size=2",
        "data.train_size=200", "data.eval_size=8", "log.progress=false", "log.tensorboard=false",
        "log.eval_every=0", f"output_dir={tmp_path}"])
    result = Trainer(config).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["warmup", "eval", "train", "train", "eval"]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    assert 0.0 <= result["reward"] <= 1.0


def test_demo_learns(tmp_path):
    """The demo itself (seed 0, as README runs it): after the warm-up, BGPO raises the held-out reward of the
    policy (4 sampled responses to each of 512 fresh puzzles, the same sampling noise at every evaluation).

    Measured: 0.358 -> 0.436 (seed 0; 0.359 -> 0.465 for seed 1 with the reward before issue 13's fix); the
    margin asserted is about half of that.
    """
    config = load_config(preset="tiny-sudoku", overrides=[
        "log.progress=false", "log.tensorboard=false", "checkpoint.every=0", "checkpoint.save_final=false",
        f"output_dir={tmp_path}"])
    Trainer(config).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == list(range(0, 241, 40))
    assert evals[0]["prompts"] == 512 and evals[0]["samples_per_prompt"] == 4
    warm_up, final = evals[0]["reward"], evals[-1]["reward"]
    assert final >= warm_up + 0.04, f"held-out reward {warm_up:.3f} after the warm-up, {final:.3f} after BGPO"
