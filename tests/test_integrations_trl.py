"""bgpo.integrations.trl: TRL's GRPOTrainer training a tiny masked diffusion LM with BGPO, on the CPU."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from bgpo.integrations.trl import DiffusionGRPOConfig  # noqa: E402
from bgpo.memory import track_peak_memory  # noqa: E402

import trl_tiny  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative import)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub calls (the machine has no network): TRL's telemetry and model-card lookups stay local."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.mark.parametrize("objective, extra", [
    ("bgpo", {}),
    ("bgpo", dict(num_iterations=2)),  # off-policy: old ELBOs computed at rollout, masks regenerated
    ("diffu_grpo", dict(num_iterations=2)),
    ("wd1", {}),
    ("vrpo", dict(num_iterations=2)),
    ("spg", {}),
])
def test_a_few_steps_train(tmp_path, objective, extra):
    trainer = trl_tiny.trainer(tmp_path, objective=objective, **extra)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert "reward" in logs[0]  # TRL logged the rollout's rewards
    if objective != "diffu_grpo":
        assert all(torch.isfinite(torch.tensor(entry["elbo"])) for entry in logs)
    changed = sum((a - b).abs().sum().item() for a, b in zip(before, trainer.model.parameters()))
    assert changed > 0


def test_threshold_sampler_and_its_metrics_are_logged(tmp_path):
    trainer = trl_tiny.trainer(tmp_path, sampler_threshold=0.0)  # every block in one forward
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["rollout/forwards_per_answer"] == 2 for entry in logs)  # 8 tokens, blocks of 4
    assert all(entry["rollout/parallel_fraction"] == 1.0 and entry["rollout/tokens_per_s"] > 0 for entry in logs)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_sampler_runs_a_slice_only(tmp_path, cache):
    trainer = trl_tiny.trainer(tmp_path, sampler_cache=cache, sampler_threshold=0.5)
    lengths = []
    embed = trainer.policy.model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    trainer.train()
    handle.remove()
    assert cache in trainer.policy._verified_caches  # checked once (dual: the last block is a prefix slice)
    sequence = max(lengths)  # prompt + 8 response tokens: the refresh forwards
    cached = {n for n in lengths if n < sequence}  # 8 response tokens, blocks of 4
    assert cached == {4} if cache == "dual" else cached == {8, 4}  # the block; or it and the rest of the answer
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(1 <= entry["rollout/forwards_per_answer"] <= 8 for entry in logs)


def test_dual_cache_refused_for_a_model_without_position_ids(tmp_path, monkeypatch):
    from bgpo.models import HFMaskedDiffusionAdapter

    monkeypatch.setattr(HFMaskedDiffusionAdapter, "kv_cache_modes", ("prefix",))  # as for LLaDA's remote code
    with pytest.raises(ValueError, match=r"sampler_cache: HFMaskedDiffusionAdapter offers the KV caches \('prefix',\), "
                                         r"not 'dual'"):
        trl_tiny.trainer(tmp_path, sampler_cache="dual")


def _update_peak(tmp_path, objective, num_mc_samples):
    """Peak memory (bytes) of a training step that only updates: the rollout happened in the step before."""
    trainer = trl_tiny.trainer(tmp_path, trl_tiny.model(hidden=64), objective=objective, num_mc_samples=num_mc_samples,
                       max_completion_length=16, block_length=8, diffusion_steps=4, steps_per_generation=2)
    rows = next(iter(trainer.get_train_dataloader()))
    trainer.training_step(trainer.model_wrapped, rows)  # rolls out 2 steps' worth, updates on the first
    with track_peak_memory("cpu") as mem:
        trainer.training_step(trainer.model_wrapped, rows)  # buffered: the update alone
    return mem.peak_bytes


def test_peak_memory_is_flat_in_nt_for_bgpo_and_grows_for_vrpo(tmp_path):
    bgpo_1, bgpo_8 = (_update_peak(tmp_path, "bgpo", n) for n in (1, 8))
    vrpo_1, vrpo_8 = (_update_peak(tmp_path, "vrpo", n) for n in (1, 8))
    assert bgpo_8 <= 1.15 * bgpo_1, (bgpo_1, bgpo_8)
    assert vrpo_8 >= 2.0 * vrpo_1, (vrpo_1, vrpo_8)


def test_gradients_accumulate_like_one_big_step(tmp_path):
    """Two accumulation micro-steps give the gradient of the whole batch: each is divided by the steps."""
    trainer = trl_tiny.trainer(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    rows = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 2
    for _ in range(2):
        trainer.training_step(trainer.model_wrapped, rows)
    accumulated = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()
    inputs = trainer._buffered_inputs
    whole = {key: torch.cat([inputs[0][key], inputs[1][key]]) if isinstance(inputs[0][key], torch.Tensor)
             and inputs[0][key].ndim else inputs[0][key] for key in inputs[0]}
    trainer._buffered_inputs = [whole, whole]
    trainer._step = 1  # use the buffer, no new rollout
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(trainer.model_wrapped, rows)
    for got, expected in zip(accumulated, (p.grad for p in trainer.model.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", ["bgpo", "diffu_grpo"])
def test_kl_to_the_initial_policy(tmp_path, objective):
    trainer = trl_tiny.trainer(tmp_path, objective=objective, beta=0.1, max_steps=3)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.args.beta == 0.1 and trainer.beta == 0.0  # TRL's own autoregressive KL stays off
    assert all(torch.equal(p, initial[n]) for n, p in trainer.reference.model.named_parameters())
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    if objective == "bgpo":  # 0 while the policy is the reference (first step), then positive
        assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logs[-1]["kl"] > 0


def test_kl_with_peft_uses_the_base_model(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trl_tiny.trainer(tmp_path, peft_config=config, beta=0.1, max_steps=2, learning_rate=5e-2)
    assert trainer.reference is None
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["kl"] > 0  # the adapters moved the policy away from the base model


def _launch(tmp_path, name, *overrides, env_extra=None):
    """Train with 2 processes (gloo, CPU) and return each rank's final parameters."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(root, "python"), root]), **(env_extra or {})}
    out = tmp_path / name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(root, "tests", "trl_tiny.py"), str(out), *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(f"{out}.rank{rank}.pt") for rank in range(2)]


def test_ddp_and_deepspeed_zero2_and_zero3_over_two_processes_agree(tmp_path):
    """Both ranks end with the same parameters (gradients were reduced), different from the initial ones; and
    DeepSpeed ZeRO-2 and ZeRO-3, whose engine runs every per-sample backward (ZeRO-3 with the LM head
    gathered for the fused op), reach the parameters DDP reaches."""
    # fp32 (TRL defaults to bf16, which DeepSpeed applies to the weights) and SGD (Adam's first steps turn
    # float noise in a ~0 gradient into a step of lr), so the runs must agree to float precision.
    common = ["per_device_train_batch_size=4", "max_steps=2", "gradient_accumulation_steps=2", "num_mc_samples=3",
              "bf16=false", "optim=sgd", "learning_rate=0.5"]
    ddp = _launch(tmp_path, "ddp", *common)
    initial = dict(trl_tiny.model().named_parameters())
    for name, value in ddp[0].items():
        torch.testing.assert_close(ddp[1][name], value, msg=name)
    assert any(not torch.equal(value, initial[name].detach()) for name, value in ddp[0].items())
    pytest.importorskip("deepspeed")
    for stage in (2, 3):
        config = (f"deepspeed={{zero_optimization: {{stage: {stage}}}, train_micro_batch_size_per_gpu: auto, "
                  "gradient_accumulation_steps: auto, train_batch_size: auto, gradient_clipping: auto}")
        deepspeed = _launch(tmp_path, f"zero{stage}", *common, config)
        assert deepspeed[0].keys() == ddp[0].keys()
        for name, value in ddp[0].items():
            torch.testing.assert_close(deepspeed[1][name], deepspeed[0][name], msg=f"ZeRO-{stage} {name}")
            torch.testing.assert_close(deepspeed[0][name], value, rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} {name}")


@pytest.mark.parametrize("field, value", [
    ("objective", "ppo"), ("num_mc_samples", 0), ("mask_scheme", "uniform"), ("block_length", 3),
    ("diffusion_steps", 3), ("beta", -0.1), ("remasking", "entropy"), ("sampler_threshold", 1.5),
    ("sampler_threshold", True), ("sampler_cache", "full"),
])
def test_config_rejects_bad_values_naming_the_field(tmp_path, field, value):
    options = dict(output_dir=str(tmp_path), max_completion_length=8, block_length=4, diffusion_steps=4,
                   report_to="none", use_cpu=True)
    options[field] = value
    with pytest.raises(ValueError, match=field):
        DiffusionGRPOConfig(**options)


@pytest.mark.parametrize("objective", ["spg", "wd1", "diffu_grpo"])
def test_clip_bound_only_with_a_ratio_to_clip(tmp_path, objective):
    """clip_bound clips the BGPO / VRPO ratio; with another objective it was silently ignored."""
    options = dict(output_dir=str(tmp_path), max_completion_length=8, block_length=4, diffusion_steps=4,
                   report_to="none", use_cpu=True, objective=objective, clip_bound=True)
    with pytest.raises(ValueError, match="^clip_bound: clips the BGPO / VRPO ratio"):
        DiffusionGRPOConfig(**options)
    DiffusionGRPOConfig(**{**options, "objective": "vrpo"})


def test_import_bgpo_does_not_import_trl():
    code = "import sys, bgpo, bgpo.integrations; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
