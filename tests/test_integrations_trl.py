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

from bgpo.integrations.trl import DiffusionGRPOConfig, DiffusionGRPOTrainer  # noqa: E402
from bgpo.memory import track_peak_memory  # noqa: E402

CHARS = "abcdefghij+=?"
VOCAB = {"<pad>": 0, "<eos>": 1, "<mask>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
TARGET = VOCAB["a"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub calls (the machine has no network): TRL's telemetry and model-card lookups stay local."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def _tokenizer():
    """A character-level fast tokenizer with pad, EOS and mask tokens, built without a download."""
    model = tokenizers.models.WordLevel(VOCAB, unk_token="<unk>")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tokenizer.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                                mask_token="<mask>", unk_token="<unk>")


def _model(hidden=32):
    """A tiny transformers Llama made bidirectional: a masked diffusion LM in all but its weights."""
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model


def count_a(completion_ids, **kwargs):
    """Synthetic reward: the fraction of the response that is the letter 'a'."""
    return [sum(token == TARGET for token in ids) / max(len(ids), 1) for ids in completion_ids]


def _trainer(tmp_path, model=None, **overrides):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=8, block_length=4, diffusion_steps=4, num_mc_samples=2, max_steps=2,
                   learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                   gradient_checkpointing=False, seed=0)
    options.update(overrides)
    dataset = datasets.Dataset.from_dict({"prompt": ["a+b=", "c+d=", "e+f=", "g+h="]})
    return DiffusionGRPOTrainer(model or _model(), reward_funcs=count_a, args=DiffusionGRPOConfig(**options),
                                train_dataset=dataset, processing_class=_tokenizer())


@pytest.mark.parametrize("objective, extra", [
    ("bgpo", {}),
    ("bgpo", dict(num_iterations=2)),  # off-policy: old ELBOs computed at rollout, masks regenerated
    ("diffu_grpo", dict(num_iterations=2)),
    ("wd1", {}),
])
def test_a_few_steps_train(tmp_path, objective, extra):
    trainer = _trainer(tmp_path, objective=objective, **extra)
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


def _update_peak(tmp_path, objective, num_mc_samples):
    """Peak memory (bytes) of a training step that only updates: the rollout happened in the step before."""
    trainer = _trainer(tmp_path, model=_model(hidden=64), objective=objective, num_mc_samples=num_mc_samples,
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
    trainer = _trainer(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
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


@pytest.mark.parametrize("field, value", [
    ("objective", "ppo"), ("num_mc_samples", 0), ("mask_scheme", "uniform"), ("block_length", 3),
    ("diffusion_steps", 3), ("beta", 0.04), ("remasking", "entropy"),
])
def test_config_rejects_bad_values_naming_the_field(tmp_path, field, value):
    options = dict(output_dir=str(tmp_path), max_completion_length=8, block_length=4, diffusion_steps=4,
                   report_to="none", use_cpu=True)
    options[field] = value
    with pytest.raises(ValueError, match=field):
        DiffusionGRPOConfig(**options)


def test_import_bgpo_does_not_import_trl():
    code = "import sys, bgpo, bgpo.integrations; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
