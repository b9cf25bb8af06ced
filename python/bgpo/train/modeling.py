"""Build the policy from the config: the model, its dtype and device, LoRA, activation checkpointing.

* ``model.path`` set: ``LLaDAModelLM.from_pretrained`` (bgpo's LLaDA), or with ``model.hf`` the
  checkpoint's own remote code through ``HFMaskedDiffusionAdapter``.
* ``model.path`` unset: a randomly initialised ``LLaDAModelLM`` of ``model.preset`` (+ ``overrides``),
  seeded, so every rank builds the same weights.
* ``model.init``: a safetensors state dict loaded on top (the CPU demo's warm-up checkpoint).
* ``lora.enabled``: peft's LoRA layers injected in place (the model keeps its class and protocol);
  only the adapters train.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from ..models import HFMaskedDiffusionAdapter, LLaDAConfig, LLaDAModelLM, enable_activation_checkpointing
from .config import LoraConfig, ModelConfig

__all__ = ["build_model", "apply_lora", "adapters_disabled", "resolve_device", "weights_fingerprint", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def build_model(config: ModelConfig, *, seed: int, device: torch.device, mask_token_id: int | None = None,
                eos_token_id: int | None = None) -> nn.Module:
    """The policy on ``device`` in ``config.dtype`` (activation checkpointing applied if asked)."""
    dtype = DTYPES[config.dtype]
    if config.path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LLaDAModelLM(LLaDAConfig.preset(config.preset, **config.overrides))
        model = model.to(device=device, dtype=dtype)
    elif config.hf:
        model = HFMaskedDiffusionAdapter.from_pretrained(
            config.path, mask_token_id=mask_token_id, eos_token_id=eos_token_id, dtype=dtype,
        ).to(device)
    else:
        model = LLaDAModelLM.from_pretrained(config.path, dtype=dtype, device=device)
    if config.init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(config.init, device=str(device)))
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def apply_lora(model: nn.Module, config: LoraConfig, *, seed: int) -> nn.Module:
    """Inject LoRA adapters in place (``peft.inject_adapter_in_model``) and freeze everything else.

    The adapters' random initialisation is seeded, so every rank (and a single process) gets the same
    ones: FSDP2 shards each rank's own copy without broadcasting it.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    lora = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=list(config.target_modules), bias="none")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = inject_adapter_in_model(lora, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"lora.target_modules: none of {config.target_modules} is a module of the model")
    return model


def weights_fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """A hex digest of the model's weights: every tensor's name, shape and dtype and an evenly strided
    sample of up to ``samples`` of its values.  Cheap at 8B parameters (a few thousand values a tensor
    leave the device) and different for any other checkpoint of a model (whose weights all differ); blind
    to an edit of a few values between the samples."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)][:samples].contiguous().cpu()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())  # the bits (numpy has no bf16)
    return digest.hexdigest()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` without its LoRA adapters (the base model) inside the block."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
