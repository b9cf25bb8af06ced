"""The trainer on a tiny model: every objective, off-policy, memory switches, LoRA, checkpoints, resume,
signals, non-finite updates, metrics."""
import json
import math
import os
import signal

import pytest
import torch

from bgpo.train import NonFiniteError, Trainer, load_config
from bgpo.train import trainer as trainer_module
from bgpo.train.checkpoint import latest_checkpoint


def tiny_config(tmp_path, *overrides):
    return load_config(None, [
        "model.tokenizer=char", "data.prompt_template={puzzle}=", "data.train_size=64", "data.eval_size=4",
        "data.generator={min_empty: 8, max_empty: 10}", "rollout.group_size=4", "rollout.gen_length=16",
        "rollout.block_length=16", "rollout.steps=4", "policy.num_samples=2", "batch_size=2", "steps=3",
        "optim.lr=1e-3", "log.progress=false", "log.tensorboard=false", "sft.steps=0", f"output_dir={tmp_path}",
        *overrides,
    ])


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("objective", ["bgpo", "vrpo", "diffu_grpo", "spg", "wd1"])
def test_one_step_of_every_objective_updates_the_model(tmp_path, objective):
    trainer = Trainer(tiny_config(tmp_path, f"policy.objective={objective}"))
    before = parameters(trainer.model)
    record = trainer.train_step()
    assert record["step"] == 1 and 0.0 <= record["reward"] <= 1.0
    assert math.isfinite(record["loss"]) and record["skipped_updates"] == 0
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter moved"


@pytest.mark.parametrize("objective", ["bgpo", "vrpo", "diffu_grpo"])
def test_off_policy_updates_use_the_old_policy_scalars(tmp_path, objective, monkeypatch):
    calls = []
    for name in ("old_policy_elbos", "old_policy_token_logprobs"):
        original = getattr(trainer_module, name)
        monkeypatch.setattr(trainer_module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    trainer = Trainer(tiny_config(tmp_path, f"policy.objective={objective}", "policy.updates_per_batch=3"))
    record = trainer.train_step()
    assert trainer.scheduler.last_epoch == 3 and record["skipped_updates"] == 0
    assert calls == (["old_policy_token_logprobs"] * 3 if objective == "diffu_grpo" else ["old_policy_elbos"])


def test_memory_switches_run(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "model.activation_checkpointing=true", "model.autocast=bfloat16",
                                  "policy.micro_batch_size=4"))
    assert math.isfinite(trainer.train_step()["loss"])
    trainer = Trainer(tiny_config(tmp_path, "model.dtype=bfloat16"))
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert math.isfinite(trainer.train_step()["loss"])


def test_micro_batches_sum_to_the_full_batch(tmp_path):
    full = Trainer(tiny_config(tmp_path / "a"))
    micro = Trainer(tiny_config(tmp_path / "b", "policy.micro_batch_size=2"))
    full.train_step(), micro.train_step()
    for (name, a), (_, b) in zip(full.model.named_parameters(), micro.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_trains_only_the_adapters(tmp_path):
    pytest.importorskip("peft")
    trainer = Trainer(tiny_config(tmp_path, "lora.enabled=true", "lora.r=4", "batch_size=4"))
    before = parameters(trainer.model)
    trainer.train_step()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    path = trainer.save_checkpoint()
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(path / "model.safetensors"))


@pytest.mark.parametrize("objective", ["bgpo", "diffu_grpo"])
def test_kl_reference_is_the_policy_rl_started_from(tmp_path, objective):
    trainer = Trainer(tiny_config(tmp_path, f"policy.objective={objective}", "policy.kl_beta=0.2", "sft.steps=2",
                                  "sft.batch_size=4", "batch_size=4"))
    trainer.warm_up()
    start = parameters(trainer.model)
    records = [trainer.train_step() for _ in range(2)]
    with trainer._reference_policy() as reference:
        assert all(torch.equal(p, start[n]) for n, p in reference.named_parameters())
        assert not any(p.requires_grad for p in reference.parameters())
    assert any(not torch.equal(p, start[n]) for n, p in trainer.model.named_parameters())
    assert all(math.isfinite(r["loss"]) for r in records)
    if objective == "bgpo":  # k3 of the ELBO log-ratio: 0 on the first step (policy = reference), then > 0
        assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6) and records[1]["kl"] > 0


def test_kl_with_lora_uses_the_base_model_as_reference(tmp_path):
    pytest.importorskip("peft")
    trainer = Trainer(tiny_config(tmp_path, "lora.enabled=true", "lora.r=4", "policy.kl_beta=0.2", "batch_size=4"))
    ids = torch.randint(0, 20, (2, 10))
    base = trainer.model.logits(ids).detach()
    trainer.train_step(), trainer.train_step()
    assert not torch.allclose(trainer.model.logits(ids), base)
    with trainer._reference_policy() as reference:
        torch.testing.assert_close(reference.logits(ids), base)
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("extra", [[], ["policy.kl_beta=0.5", "sft.steps=2", "sft.batch_size=4"]],
                         ids=["plain", "kl-after-warm-up"])
def test_resume_continues_exactly(tmp_path, extra):
    """With KL the resumed run rebuilds its reference from the warm-up's weights, not from the checkpoint."""
    options = ["steps=4", "optim.schedule=cosine", "optim.warmup_steps=1", *extra]
    straight = Trainer(tiny_config(tmp_path / "straight", *options))
    straight.train()
    first = Trainer(tiny_config(tmp_path / "resumed", *options))
    if not first.warmed_up:
        first.warm_up()
    first.train_step(), first.train_step()
    first.save_checkpoint()
    del first
    resumed = Trainer(tiny_config(tmp_path / "resumed", *options, "checkpoint.resume=true"))
    resumed.train()
    assert resumed.step == 4
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "checkpoint.keep=1"))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".step-00000001.tmp").mkdir()  # a torn write from a crash
    trainer.train_step()
    trainer.save_checkpoint()
    trainer.train_step()
    path = trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path / "checkpoints") == path
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "optimizer.pt", "trainer.pt", "config.yaml",
                                            "complete.json"}


def test_signal_finishes_the_step_checkpoints_and_stops(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, "steps=5"))
    previous = signal.getsignal(signal.SIGTERM)
    step = trainer.train_step

    def step_then_signal():
        record = step()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    result = trainer.train()
    assert result["stopped"] and result["signal"] == signal.SIGTERM and trainer.step == 2
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000002"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_signal_during_the_warm_up_stops_after_the_current_step(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, "sft.steps=20", "sft.batch_size=4"))
    previous = signal.getsignal(signal.SIGINT)
    steps = []
    forward = trainer.model.hidden_states

    def forward_then_signal(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer.model, "hidden_states", forward_then_signal)
    result = trainer.train()
    assert result == {"kind": "warmup", "stopped": True, "signal": signal.SIGINT} and len(steps) == 3
    assert not trainer.warmed_up and not (tmp_path / "warmup.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is previous


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, "optim.max_nonfinite=2"))
    original = trainer_module.accumulate_policy_gradient

    def poisoned(model, batch, **kwargs):
        out = original(model, batch, **kwargs)
        next(model.parameters()).grad.fill_(float("nan"))
        return out

    monkeypatch.setattr(trainer_module, "accumulate_policy_gradient", poisoned)
    before = parameters(trainer.model)
    record = trainer.train_step()
    assert record["skipped_updates"] == 1 and trainer.nonfinite_total == 1
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    with pytest.raises(NonFiniteError, match="optim.max_nonfinite: 2 updates in a row"):
        trainer.train_step()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["nonfinite", "nonfinite"]


def test_train_writes_metrics_and_evaluates(tmp_path):
    result = Trainer(tiny_config(tmp_path, "steps=2", "log.eval_every=1")).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds == ["eval", "train", "eval", "train", "eval"]
    train = records[1]
    for key in ("reward", "loss", "elbo_per_token", "step_time_s", "peak_memory_mib", "lr", "grad_norm"):
        assert key in train
    assert result["kind"] == "eval" and 0 <= result["accuracy"] <= result["reward"] + 1e-9 <= 1 + 1e-9
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000002"


def test_sampled_evaluation_scores_several_responses_per_prompt_with_fixed_noise(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "log.eval_temperature=1.0", "log.eval_samples=3", "data.eval_size=5"))
    first, again = trainer.evaluate(), trainer.evaluate()
    assert first["prompts"] == 5 and first["samples_per_prompt"] == 3 and first["temperature"] == 1.0
    assert first["reward"] == again["reward"]  # same sampling noise: checkpoints are compared pairwise
    rolled = trainer.rollout(trainer.eval_examples, group_size=3, temperature=1.0, seed_parts=(0, -1),
                             first_index=0, chunk=64)
    rewards, _ = trainer.score(rolled["completions"], trainer.eval_examples)
    assert first["reward"] == pytest.approx(rewards.double().mean().item())


def test_warm_up_saves_a_checkpoint_to_start_rl_from(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "sft.steps=3", "sft.batch_size=8", "steps=0", "data.eval_size=0"))
    trainer.train()
    assert (tmp_path / "warmup.safetensors").is_file()
    again = Trainer(tiny_config(tmp_path / "b", f"model.init={tmp_path / 'warmup.safetensors'}"))
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_a_hugging_face_checkpoint_trains_through_the_adapter(tmp_path, monkeypatch, cache):
    """``model.path`` + ``model.hf``: a saved transformers model and tokenizer, loaded and driven through
    ``HFMaskedDiffusionAdapter`` (a tiny Llama made bidirectional, see tests/trl_tiny.py)."""
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")  # trl_tiny (the model and tokenizer builders) imports it
    import trl_tiny

    checkpoint = tmp_path / "checkpoint"
    trl_tiny.model().save_pretrained(checkpoint)
    trl_tiny.tokenizer().save_pretrained(checkpoint)
    (tmp_path / "letters.py").write_text("def distinct(completion, example):\n    return len(set(completion)) / 8\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    trainer = Trainer(load_config(None, [
        f"model.path={checkpoint}", "model.hf=true", "reward=letters:distinct", "data.prompt_template=a+{puzzle}=",
        "data.train_size=16", "data.eval_size=2", "rollout.group_size=4", "rollout.gen_length=8",
        "rollout.block_length=4", "rollout.steps=4", "policy.num_samples=2", "batch_size=2", "steps=2",
        "optim.lr=1e-2", "log.progress=false", "log.tensorboard=false", f"output_dir={tmp_path / 'run'}",
        f"rollout.cache={cache or 'null'}"]))
    assert type(trainer.model).__name__ == "HFMaskedDiffusionAdapter"
    assert trainer.mask_id == trl_tiny.VOCAB["<mask>"]
    before = parameters(trainer.model)
    result = trainer.train()
    assert result["kind"] == "eval"
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert (cache in trainer.model._verified_caches) if cache else not trainer.model._verified_caches
