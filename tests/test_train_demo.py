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
