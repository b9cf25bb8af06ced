"""Resume never loses a run: kills at every point of a checkpoint save, real SIGKILLs, a full disk,
non-finite weights, a changed config, signals and exit codes, metrics without duplicates.

The kill trials run a tiny model for 2 steps with a checkpoint after each; a fault injector stops the
run ("kills" it: an exception no code of the trainer catches) at the k-th filesystem operation of the
saves, or leaves the file being written torn.  A new trainer then resumes, and must start from the
newest complete checkpoint and end bit-identical to an uninterrupted run, with one metrics record per step.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bgpo.cli import train_main
from bgpo.train import Trainer
from bgpo.train import checkpoint as checkpoint_module
from bgpo.train import trainer as trainer_module
from bgpo.train.checkpoint import CheckpointError, complete_checkpoints, find_checkpoint, latest_checkpoint
from bgpo.train.metrics import learning_signals
from bgpo.train.distributed import DistributedContext
from bgpo.train.trainer import NonFiniteError
from test_train_loop import tiny_config

ROOT = Path(__file__).resolve().parents[1]
# A reward that varies between the random model's responses, so advantages and updates are not zero.
RUN = ["steps=2", "checkpoint.every=1", "checkpoint.keep=1", "data.eval_size=0", "data.train_size=16",
       "reward=test_resume:distinct"]
VOLATILE = ("step_time_s", "peak_memory_mib", "rollout_tokens_per_s")  # wall-clock and RSS differ between runs


def distinct(completion, example):
    return len(set(completion)) / 16


class Killed(BaseException):
    """The process "dies" here: no ``except Exception`` of the trainer or the checkpoint code runs."""


class _Proxy:
    """A module with some functions replaced (so the real ``os``/``shutil`` stay untouched elsewhere)."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._module, name)


class Injector:
    """Counts the filesystem operations of checkpoint saves; at operation ``kill_at`` raises ``Killed``
    before it runs or, for ``torn=True`` on a file write, after writing half of the file."""

    def __init__(self, kill_at: int | None = None, torn: bool = False):
        self.kill_at, self.torn, self.operations = kill_at, torn, []
        self.write, self.fsync = checkpoint_module._write, checkpoint_module._fsync

    def _operation(self, name: str) -> bool:
        self.operations.append(name)
        return len(self.operations) - 1 == self.kill_at

    def install(self, monkeypatch):
        def write(path, writer):
            if not self._operation(f"write {path.name}"):
                return self.write(path, writer)
            if self.torn:
                writer(path)
                os.truncate(path, path.stat().st_size // 2)
            raise Killed(path)

        def wrap(name, function):
            def wrapped(*args, **kwargs):
                if self._operation(f"{name} {Path(args[0]).name}"):
                    raise Killed(name)
                return function(*args, **kwargs)
            return wrapped

        monkeypatch.setattr(checkpoint_module, "_write", write)
        monkeypatch.setattr(checkpoint_module, "_fsync", wrap("fsync", self.fsync))
        monkeypatch.setattr(checkpoint_module, "os", _Proxy(os, replace=wrap("replace", os.replace)))
        monkeypatch.setattr(checkpoint_module, "shutil", _Proxy(shutil, rmtree=wrap("rmtree", shutil.rmtree)))
        return self


def _records(run: Path) -> str:
    """The metrics records without the volatile values, as JSON text (NaN compares equal to NaN)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.dumps([{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines])


def _parameters(trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run, and the filesystem operations of its saves (counted by the injector)."""
    run = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as monkeypatch:
        injector = Injector().install(monkeypatch)
        trainer = Trainer(tiny_config(run, *RUN))
        initial = _parameters(trainer)
        trainer.train()
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters()), "nothing learnt"
    return {"parameters": _parameters(trainer), "records": _records(run), "operations": injector.operations}


@pytest.fixture(scope="module")
def before_last_save(tmp_path_factory):
    """A run stopped just before its second save, as ``train()`` leaves it: step 1 checkpointed, the
    metrics of steps 1 and 2 written, the trainer in memory at step 2 (with the global RNG state the save
    records).  Each trial copies the directory and runs the save with a fault."""
    run = tmp_path_factory.mktemp("before-last-save")
    trainer = Trainer(tiny_config(run, *RUN))
    for _ in range(2):
        trainer._log(trainer.train_step())
        if trainer.step == 1:
            trainer.save_checkpoint()
    trainer.metrics.close()
    return trainer, run, checkpoint_module.rng_state()


def _assert_resumes_like_the_straight_run(run: Path, straight: dict) -> Trainer:
    found, _ = find_checkpoint(run / "checkpoints")
    resumed = Trainer(tiny_config(run, *RUN, "checkpoint.resume=true"))
    resumed.train()
    assert resumed._resume_from == found
    for name, value in straight["parameters"].items():
        assert torch.equal(dict(resumed.model.named_parameters())[name], value), name
    assert _records(run) == straight["records"]  # one record per step: nothing lost, nothing twice
    assert latest_checkpoint(run / "checkpoints").name == "step-00000002"
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    return resumed


def _newest_after(operations: list[str], saves_before: int) -> str | None:
    """The checkpoint a kill after ``operations`` must leave as the newest complete one: the last step
    whose directory was renamed into place."""
    renamed = saves_before + sum(name.startswith("replace .step-") for name in operations[:-1])
    return f"step-{renamed:08d}" if renamed else None


# Every filesystem operation of the last save (20: temporary directory, 4 files and the marker each
# written and fsynced, renames, `latest`, pruning step 1) is a kill point, and each file write of it
# (the model, the optimizer, the marker, `latest`) is also torn half-way: 24 in-process trials.  Three
# more kill a whole run inside its first save.
LAST_SAVE = [(k, False) for k in range(20)] + [(k, True) for k in (1, 3, 9, 15)]
FIRST_SAVE = [9, 13, 17]  # before the marker, before the rename, before `latest` is replaced


def test_the_trials_cover_every_operation_of_a_save(straight):
    operations = straight["operations"]
    assert len(operations) == 39 and operations[19].startswith("rmtree .step-00000002"), operations
    last = operations[19:]
    assert [last[k] for k, torn in LAST_SAVE if torn] == ["write model.safetensors", "write optimizer.pt",
                                                          "write complete.json", "write .latest.tmp"]
    assert [operations[k].split()[0] for k in FIRST_SAVE] == ["write", "replace", "replace"]
    assert len(LAST_SAVE) + len(FIRST_SAVE) >= 20


@pytest.mark.parametrize("kill_at, torn", LAST_SAVE, ids=[f"{'torn' if t else 'kill'}-{k}" for k, t in LAST_SAVE])
def test_a_kill_anywhere_in_a_save_resumes_from_the_newest_complete_checkpoint_bit_identical(
        tmp_path, monkeypatch, straight, before_last_save, kill_at, torn):
    trainer, prepared, rng = before_last_save
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    trainer.output_dir, trainer._saved_step = run, None
    checkpoint_module.set_rng_state(rng)
    with monkeypatch.context() as patch:
        injector = Injector(kill_at, torn).install(patch)
        with pytest.raises(Killed):
            trainer.save_checkpoint()
    found, _ = find_checkpoint(run / "checkpoints")
    assert (found.name if found else None) == _newest_after(injector.operations, saves_before=1)
    _assert_resumes_like_the_straight_run(run, straight)


@pytest.mark.parametrize("kill_at", FIRST_SAVE)
def test_a_run_killed_in_its_first_save_resumes_bit_identical(tmp_path, monkeypatch, straight, kill_at):
    with monkeypatch.context() as patch:
        injector = Injector(kill_at).install(patch)
        with pytest.raises(Killed):
            Trainer(tiny_config(tmp_path, *RUN)).train()
    found, _ = find_checkpoint(tmp_path / "checkpoints")
    assert (found.name if found else None) == _newest_after(injector.operations, saves_before=0)
    _assert_resumes_like_the_straight_run(tmp_path, straight)


def _run(tmp_path, *overrides) -> Trainer:
    trainer = Trainer(tiny_config(tmp_path, *RUN, *overrides))
    trainer.train()
    return trainer


def test_a_missing_or_broken_latest_falls_back_to_the_newest_complete_checkpoint_and_says_so(tmp_path, capsys):
    _run(tmp_path, "checkpoint.keep=3")
    checkpoints = tmp_path / "checkpoints"
    for damage in ("missing", "garbage", "older", "incomplete"):
        if damage == "missing":
            (checkpoints / "latest").unlink()
        elif damage == "garbage":
            (checkpoints / "latest").write_bytes(b"\xff../../etc\n")
        elif damage == "older":
            (checkpoints / "latest").write_text("step-00000001\n")
        else:  # latest names a checkpoint whose marker disagrees with its files: step 1 is the newest complete
            (checkpoints / "latest").write_text("step-00000002\n")
            with open(checkpoints / "step-00000002" / "optimizer.pt", "ab") as f:
                f.write(b"torn")
        expected = "step-00000001" if damage == "incomplete" else "step-00000002"
        found, note = find_checkpoint(checkpoints)
        assert found.name == expected and note is not None and f"resuming from the newest complete checkpoint, " \
            f"{expected}" in note, (damage, note)
        resumed = Trainer(tiny_config(tmp_path, *RUN, "checkpoint.resume=true", "checkpoint.keep=3"))
        assert resumed._resume_from == found and expected in capsys.readouterr().out
        assert latest_checkpoint(checkpoints) == found  # repaired


def test_no_complete_checkpoint_starts_over_and_says_so(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)  # no marker: a leftover, never used
    (tmp_path / "checkpoints" / "latest").write_text("step-00000001\n")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    trainer = Trainer(tiny_config(tmp_path, *RUN, "checkpoint.resume=true", "steps=1"))
    assert trainer._resume_from is None and "no complete checkpoint" in capsys.readouterr().out
    trainer.train()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_the_last_step_is_saved_once(tmp_path, monkeypatch):
    saved = []
    original = trainer_module.save_checkpoint
    monkeypatch.setattr(trainer_module, "save_checkpoint", lambda *a, **k: saved.append(k["step"]) or original(*a, **k))
    _run(tmp_path)  # steps=2, every=1, save_final=true
    assert saved == [1, 2]
    trainer = Trainer(tiny_config(tmp_path / "b", *RUN))
    trainer.train_step()
    trainer.save_checkpoint()
    trainer._saved_step = None  # even past the trainer's guard, a complete checkpoint is never replaced
    with pytest.raises(CheckpointError, match="step-00000001 is already saved"):
        trainer.save_checkpoint()


def test_pruning_never_deletes_the_current_or_a_newer_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, *RUN))
    trainer.train_step()
    trainer.save_checkpoint()  # step 1
    stale = tmp_path / "checkpoints" / "step-00000099"  # a complete, newer checkpoint (e.g. copied in)
    shutil.copytree(tmp_path / "checkpoints" / "step-00000001", stale)
    marker = json.loads((stale / "complete.json").read_text())
    (stale / "complete.json").write_text(json.dumps({**marker, "step": 99}))
    trainer.train_step()
    trainer.save_checkpoint()  # keep=1: step 1 goes; the current and the newer one stay
    assert [p.name for _, p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-00000002", "step-00000099"]
    assert not (tmp_path / "checkpoints" / "step-00000001").exists()


def test_resume_with_a_different_config_is_refused_naming_the_keys(tmp_path, capsys):
    _run(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint.resume: this config differs .*batch_size: 2 -> 4; "
                                         r".*seed: 0 -> 1.*--force-resume"):
        Trainer(tiny_config(tmp_path, *RUN, "checkpoint.resume=true", "seed=1", "batch_size=4"))
    assert train_main([*_cli(tmp_path), "--resume", "policy.objective=vrpo"]) == 2
    err = capsys.readouterr().err
    assert "config error: checkpoint.resume: " in err and "policy.objective: 'bgpo' -> 'vrpo'" in err
    forced = Trainer(tiny_config(tmp_path, *RUN, "checkpoint.resume=true", "checkpoint.force_resume=true", "seed=1"))
    assert forced._resume_from.name == "step-00000002" and "seed: 0 -> 1" in capsys.readouterr().out
    longer = Trainer(tiny_config(tmp_path, *RUN, "checkpoint.resume=true", "steps=3", "log.progress=true"))
    assert longer._resume_from.name == "step-00000002"  # steps and logging may change


def test_force_resume_takes_the_new_optimizer_settings(tmp_path, capsys):
    """Regression: optim.* changed under --force-resume was announced but the checkpoint's lr, betas, eps and
    weight decay (optimizer and scheduler state) went on being used."""
    _run(tmp_path)
    forced = Trainer(tiny_config(tmp_path, *RUN, "checkpoint.resume=true", "checkpoint.force_resume=true",
                                 "optim.lr=1e-5", "optim.weight_decay=0.1", "optim.betas=[0.5,0.6]",
                                 "optim.eps=1e-6"))
    assert forced.resume() and "optim.lr: 0.001 -> 1e-05" in capsys.readouterr().out
    for group in forced.optimizer.param_groups:
        assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (1e-5, 0.1, (0.5, 0.6), 1e-6)
    assert forced.scheduler.get_last_lr() == [1e-5] and forced.scheduler.base_lrs == [1e-5]
    assert forced.train_step()["lr"] == 1e-5  # constant schedule: the next update's lr, then logged


def test_extending_a_decayed_run_resumes_on_the_new_schedule(tmp_path):
    """Regression: with a linear schedule, a run of 1 step resumed with steps=3 made its first resumed update
    with the old schedule's lr (0 at its end: no weight moved) instead of the new schedule's."""
    linear = ["optim.schedule=linear", "steps=1"]
    _run(tmp_path, *linear)
    longer = Trainer(tiny_config(tmp_path, *RUN, *linear, "checkpoint.resume=true", "steps=3"))
    assert longer.resume() and longer.step == 1
    straight = Trainer(tiny_config(tmp_path / "straight", *RUN, "optim.schedule=linear", "steps=3"))
    straight.train_step()
    assert longer.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"] > 0
    before = [p.detach().clone() for p in longer.parameters]
    longer.train_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, longer.parameters))


def test_a_new_run_refuses_a_directory_with_checkpoints(tmp_path):
    _run(tmp_path)
    with pytest.raises(ValueError, match="checkpoint.resume: .* holds the checkpoints of an earlier run"):
        Trainer(tiny_config(tmp_path, *RUN))


def test_a_new_run_refuses_what_a_run_without_checkpoints_left(tmp_path):
    """Regression: a run that left no checkpoint (save_final=false) lost its metrics to the next run into its
    output_dir; now that run is refused, and --resume starts again from step 0 (dropping them) on request."""
    _run(tmp_path, "checkpoint.every=0", "checkpoint.save_final=false")
    assert not complete_checkpoints(tmp_path / "checkpoints") and len(json.loads(_records(tmp_path))) == 2
    with pytest.raises(ValueError, match=r"checkpoint.resume: an earlier run left .*metrics.jsonl and no checkpoint"):
        Trainer(tiny_config(tmp_path, *RUN, "seed=7"))
    assert len(json.loads(_records(tmp_path))) == 2  # untouched
    again = Trainer(tiny_config(tmp_path, *RUN, "checkpoint.resume=true"))
    assert not again.resume() and json.loads(_records(tmp_path)) == []


def test_metrics_are_truncated_to_the_checkpoint_on_resume(tmp_path, straight):
    _run(tmp_path, "checkpoint.keep=2")
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000002")  # as if killed before step 2's checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # and mid-line
    _run(tmp_path, "checkpoint.resume=true")
    assert _records(tmp_path) == straight["records"]


def test_resuming_the_warm_up_checkpoint_does_not_evaluate_step_0_twice(tmp_path):
    options = ["sft.steps=2", "sft.batch_size=4", "data.eval_size=2", "checkpoint.every=0"]
    _run(tmp_path, *options, "steps=0")  # warm up only: evaluation and checkpoint at step 0
    _run(tmp_path, *options, "steps=1", "checkpoint.resume=true")
    kinds = [(r["kind"], r["step"]) for r in json.loads(_records(tmp_path))]
    assert kinds == [("warmup", 0), ("eval", 0), ("train", 1), ("eval", 1)]


def _cli(run: Path) -> list[str]:
    return ["model.tokenizer=char", "data.prompt_template={puzzle}=", "data.generator={min_empty: 8, max_empty: 10}",
            "rollout.group_size=4", "rollout.gen_length=16", "rollout.block_length=16", "rollout.steps=4",
            "policy.num_samples=2", "batch_size=2", "optim.lr=1e-3", "log.progress=false", "log.tensorboard=false",
            f"output_dir={run}", *RUN]


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs /dev/full (always ENOSPC)")
def test_a_full_disk_names_the_file_and_the_cause_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    trainer = Trainer(tiny_config(tmp_path, *RUN))
    trainer.train_step()
    first = trainer.save_checkpoint()
    trainer.train_step()
    # optimizer.pt goes to /dev/full: the real ENOSPC of a full disk
    monkeypatch.setattr(checkpoint_module, "open", lambda path, mode: open("/dev/full", mode), raising=False)
    with pytest.raises(CheckpointError, match=r"cannot write .*\.step-00000002\.tmp/optimizer\.pt: No space left on "
                                              r"device; \d+ MiB free"):
        trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path / "checkpoints") == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    monkeypatch.undo()

    def short_write(state, path):  # a short model file, however it came about, is caught before the marker
        original(state, path)
        os.truncate(path, path.stat().st_size - 8)

    import safetensors.torch
    original = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", short_write)
    with pytest.raises(CheckpointError, match=r"cannot write .*model\.safetensors: .*incomplete"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint_module, "open", lambda path, mode: open("/dev/full", mode), raising=False)
    assert train_main([*_cli(tmp_path / "cli")]) == 1
    assert "bgpo train: error: checkpoint: cannot write" in capsys.readouterr().err


def test_a_step_that_leaves_non_finite_weights_is_not_checkpointed(tmp_path, monkeypatch, capsys):
    def overflowing(step):  # an update that overflows (finite lr and gradient, inf weights)
        def poisoned(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            self.param_groups[0]["params"][0].data[0] = float("inf")
            return out
        return poisoned

    trainer = Trainer(tiny_config(tmp_path, *RUN, "steps=3"))
    trainer.train_step()
    first = trainer.save_checkpoint()
    optimizer = trainer.optimizer  # the LR scheduler wrapped the bound method: patch the instance
    monkeypatch.setattr(optimizer, "step", overflowing(lambda self: type(optimizer).step(self)).__get__(optimizer))
    with pytest.raises(NonFiniteError, match="optim.lr: the update of step 2 .* left non-finite parameters; it is "
                                             "not checkpointed"):
        trainer.train()
    assert [p for _, p in complete_checkpoints(tmp_path / "checkpoints")] == [first]
    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing(torch.optim.AdamW.step))  # before the scheduler wraps it
    assert train_main(_cli(tmp_path / "cli")) == 1
    assert "optim.lr: the update of step 1" in capsys.readouterr().err
    assert not (tmp_path / "cli" / "checkpoints").exists()


def test_a_signal_during_start_up_exits_with_its_code_and_saves_nothing(tmp_path, monkeypatch, capsys):
    def start_up_interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("the signal did not stop the start-up")

    monkeypatch.setattr(Trainer, "__init__", start_up_interrupted)
    previous = signal.getsignal(signal.SIGTERM)
    assert train_main(_cli(tmp_path)) == 143
    assert "stopped by SIGTERM during start-up; nothing saved" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists() and signal.getsignal(signal.SIGTERM) is previous


def test_a_signal_stops_after_the_step_with_a_checkpoint_and_exit_code_128_plus_signal(tmp_path, monkeypatch):
    step = Trainer.train_step

    def step_then_interrupt(self):
        record = step(self)
        os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    assert train_main([*_cli(tmp_path), "steps=5", "checkpoint.every=0"]) == 130
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000001"


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out and "130  stopped by SIGINT, 143 by SIGTERM" in out and "--force-resume" in out


def test_sigkill_at_random_points_then_resume_ends_bit_identical(tmp_path):
    """Real kills: ``python -m bgpo.train`` SIGKILLed at a random time after its first checkpoint (in a
    step, in a save, in the metrics), then resumed, twice; the final weights equal an uninterrupted run's."""
    (tmp_path / "variety.py").write_text("def distinct(completion, example):\n    return len(set(completion)) / 16\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(tmp_path)])}
    overrides = ["steps=5", "checkpoint.keep=2", "reward=variety:distinct"]  # (importing this file costs time)

    def command(run, *extra):
        return [sys.executable, "-m", "bgpo.train", *_cli(run), *overrides, *extra]

    subprocess.run(command(tmp_path / "straight"), env=env, check=True, capture_output=True, timeout=300)
    expected = load_file(tmp_path / "straight" / "checkpoints" / "step-00000005" / "model.safetensors")
    rng = random.Random(13)
    for trial in range(2):
        run = tmp_path / f"killed-{trial}"
        process = subprocess.Popen(command(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while not complete_checkpoints(run / "checkpoints") and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        process.kill()
        process.wait()
        result = subprocess.run(command(run, "--resume"), env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        final = load_file(run / "checkpoints" / "step-00000005" / "model.safetensors")
        assert all(torch.equal(final[k], v) for k, v in expected.items())
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5]


def test_learning_signals_are_what_the_loss_is_not():
    elbo = torch.tensor([[-4.0, -8.0, -6.0, -6.0], [-6.0, -10.0, -6.0, -6.0]])  # (n_t=2, N=4): ELBO -5, -9, -6, -6
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.0])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    lengths = torch.tensor([5, 3, 4, 4])
    out = learning_signals(elbo, advantages, rewards, lengths, 2, DistributedContext())
    assert out["groups_with_signal"] == 0.5  # the second group's rewards are equal
    assert out["surrogate"] == pytest.approx((-5.0 + 9.0) / 4)
    assert out["elbo_rewarded"] == pytest.approx(-1.0) and out["elbo_unrewarded"] == pytest.approx(-3.0)
    assert set(learning_signals(None, advantages, rewards, lengths, 2, DistributedContext())) == {"groups_with_signal"}


def test_on_policy_the_loss_is_zero_but_the_logged_signals_are_not(tmp_path, straight):
    record = json.loads(straight["records"])[0]
    assert record["loss"] == pytest.approx(0.0, abs=1e-6) and record["groups_with_signal"] > 0
    assert record["surrogate"] != 0 and record["elbo_rewarded"] == record["elbo_rewarded"]  # not NaN


def test_lora_adapters_resume_only_on_their_base_weights(tmp_path, monkeypatch, capsys):
    """A LoRA checkpoint holds the adapters only: resumed on other base weights (the file at model.path
    replaced: no config key changes) it is refused, naming it, unless --force-resume; on the same base it
    resumes."""
    pytest.importorskip("peft")
    lora = [*RUN, "lora.enabled=true", "lora.r=4", "steps=1"]
    Trainer(tiny_config(tmp_path, *lora)).train()
    resume = [*lora, "steps=2", "checkpoint.resume=true"]
    build = trainer_module.build_model

    def replaced_base(*args, **kwargs):
        model = build(*args, **kwargs)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1.01)
        return model

    monkeypatch.setattr(trainer_module, "build_model", replaced_base)
    with pytest.raises(CheckpointError, match="trained on other base weights.*--force-resume"):
        Trainer(tiny_config(tmp_path, *resume)).train()
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()
    forced = Trainer(tiny_config(tmp_path, *resume, "checkpoint.force_resume=true"))
    assert forced.resume() and "continuing although the LoRA adapters" in capsys.readouterr().out
    monkeypatch.setattr(trainer_module, "build_model", build)
    same = Trainer(tiny_config(tmp_path, *resume))
    same.train()
    assert same.step == 2 and (tmp_path / "checkpoints" / "step-00000002").is_dir()
