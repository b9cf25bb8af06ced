"""Export a trainer checkpoint as a Hugging Face folder: ``config.json`` + ``model.safetensors``.

``bgpo export CHECKPOINT OUT_DIR`` (or ``export_hf``) writes the weights under LLaDA's own parameter
names (``model.transformer.blocks.0.q_proj.weight``...: the inverse of the mapping in
``bgpo.models.loading``) and LLaDA's ``config.json`` fields, architecture switches included, so the folder
loads with ``LLaDAModelLM.from_pretrained(OUT_DIR)`` and, once LLaDA's ``configuration_llada.py`` and
``modeling_llada.py`` are copied next to it, with ``transformers.AutoModel.from_pretrained(OUT_DIR,
trust_remote_code=True)`` (``auto_map`` names them; bgpo cannot ship them).

``CHECKPOINT`` is a checkpoint directory (``checkpoints/step-N``), or a run's ``checkpoints/`` or output
directory (its newest complete checkpoint is exported).  The model's shape comes from the checkpoint's
``config.yaml``: ``model.preset`` + ``model.overrides``, or the ``config.json`` of ``model.path``.
Checkpoints are untrusted input: the config is read with ``yaml.safe_load``, the weights from safetensors
(no pickle), and every tensor must be a parameter of the model with the model's shape.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .config import LLaDAConfig
from .llada import LLaDAModelLM
from .loading import llada_state_dict, read_safetensors

__all__ = ["export_hf", "hf_config", "resolve_checkpoint", "LLADA_HF_FIELDS"]

# config.json fields of the released LLaDA checkpoints that LLaDA's own code reads and bgpo's config does
# not carry (bgpo implements exactly these settings).
LLADA_HF_FIELDS = {
    "architectures": ["LLaDAModelLM"],
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
    "alibi_bias_max": 8.0,
    "attention_dropout": 0.0,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "mlp_ratio": 4,  # unused: mlp_hidden_size is always written
    "multi_query_attention": None,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rope_full_precision": True,
    "use_cache": False,
}


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself, or the newest complete one under it."""
    from ..train.checkpoint import find_checkpoint

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint: {path} is not a directory")
    if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        return path
    for directory in (path, path / "checkpoints"):
        found, _ = find_checkpoint(directory)
        if found is not None:
            return found
    raise ValueError(f"checkpoint: {path} holds no checkpoint (model.safetensors + config.yaml), nor a "
                     "checkpoints/ directory with a complete one")


def _model_config(checkpoint: Path) -> LLaDAConfig:
    """The model's shape from the run's config (``model.preset``/``overrides`` or ``model.path``)."""
    from ..train.checkpoint import checkpoint_config

    run = checkpoint_config(checkpoint)
    model, lora = run.get("model"), run.get("lora")
    if not isinstance(model, dict):
        raise ValueError(f"checkpoint: {checkpoint / 'config.yaml'} has no 'model' section")
    if model.get("hf"):
        raise ValueError("checkpoint: model.hf is set (a model run through its own remote code): its weights "
                         "are already under that code's names; save them with the model's save_pretrained")
    if isinstance(lora, dict) and lora.get("enabled"):
        raise ValueError("checkpoint: a LoRA run's checkpoint holds only the adapters; export needs full weights")
    if model.get("path"):
        return LLaDAConfig.from_json(model["path"])
    overrides = model.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"checkpoint: model.overrides in {checkpoint / 'config.yaml'} is not a mapping")
    return LLaDAConfig.preset(str(model.get("preset")), **overrides)


def hf_config(config: LLaDAConfig, torch_dtype: str = "float32") -> dict:
    """The ``config.json`` of a LLaDA checkpoint of shape ``config`` (LLaDA-8B's own for the ``llada-8b`` preset)."""
    return {**LLADA_HF_FIELDS, **config.to_dict(), "torch_dtype": torch_dtype}


def export_hf(checkpoint: str | Path, out_dir: str | Path, *, dtype: str | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (LLaDA's names) for ``checkpoint`` into ``out_dir``.

    ``dtype``: ``"float32"``, ``"bfloat16"`` or ``"float16"`` to convert the weights (default: as saved).
    Returns ``out_dir``.  ``out_dir`` must not hold a ``config.json`` or ``model.safetensors`` already.
    """
    import torch
    from safetensors.torch import save_file

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        raise ValueError(f"dtype: expected None or one of {sorted(dtypes)}, got {dtype!r}")
    source = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    for name in ("config.json", "model.safetensors"):
        if (out / name).exists():
            raise ValueError(f"out_dir: {out / name} exists; export into an empty directory")
    config = _model_config(source)
    weights = read_safetensors(source / "model.safetensors")
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    expected = dict(model.named_parameters())
    problems = sorted(set(expected) ^ set(weights))
    if problems:
        raise ValueError(f"checkpoint: {source / 'model.safetensors'} does not hold the parameters of the model "
                         f"its config.yaml describes (LoRA adapters only?); differing names: {problems[:5]}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"checkpoint: {name} has shape {tuple(tensor.shape)}, the config's model "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(weights, assign=True)
    state = {name: t.to(dtypes[dtype]) if dtype else t for name, t in llada_state_dict(model).items()}
    stored = next(iter(state.values())).dtype
    out.mkdir(parents=True, exist_ok=True)
    # Each file is written under a temporary name and renamed into place: an export killed midway leaves
    # no torn file that a rerun would refuse as existing.
    temporary = out / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, temporary, metadata={"format": "pt"})
    os.replace(temporary, out / "model.safetensors")
    fields = hf_config(config, str(stored).removeprefix("torch."))
    temporary = out / ".config.json.tmp"
    temporary.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, out / "config.json")
    return out
