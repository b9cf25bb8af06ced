"""``LLaDAConfig``: the shape of a LLaDA model, read from the fields of LLaDA's ``config.json``.

LLaDA's configuration (``configuration_llada.py``, an OLMo descendant) has many switches; the released
LLaDA checkpoints use one setting of them: Llama-style blocks (``block_type="llama"``), SwiGLU
(``activation_type="silu"`` with a separate ``up_proj``), RMSNorm without bias, RoPE, no ALiBi, no
logit scaling.  ``from_dict`` reads the fields that vary between checkpoints and refuses a config
that asks for a switch this implementation does not have, naming the field, rather than building a
model that silently computes something else.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..ops._checks import check_bool, check_int, check_real

__all__ = ["LLaDAConfig"]

# Fields of LLaDA's config.json that select an architecture variant, and the value this
# implementation supports.  A field that is absent takes LLaDA's released value.
_SUPPORTED_VARIANT = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "rope": True,
    "alibi": False,
    "scale_logits": False,
    "input_emb_norm": False,
    "attention_layer_norm": False,
    "block_group_size": 1,
}


@dataclass(frozen=True)
class LLaDAConfig:
    """Hyper-parameters of a LLaDA model; field names are those of LLaDA's ``config.json``.

    ``vocab_size`` is the tokenizer's vocabulary; ``embedding_size`` (LLaDA pads it to a multiple of
    128) is the number of rows of the embedding and LM head matrices, ``vocab_size`` when ``None``.
    """

    d_model: int
    n_layers: int
    n_heads: int
    mlp_hidden_size: int
    vocab_size: int
    n_kv_heads: int | None = None
    embedding_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    include_bias: bool = False
    include_qkv_bias: bool = False
    weight_tying: bool = False
    init_std: float = 0.02
    mask_token_id: int = 126336
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size", "max_sequence_length"):
            check_int(name, getattr(self, name), low=1)
        for name in ("n_kv_heads", "embedding_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=1)
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            check_real(name, getattr(self, name), positive=True)
        for name in ("include_bias", "include_qkv_bias", "weight_tying"):
            check_bool(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads: head size d_model/n_heads={self.d_model // self.n_heads} must be even (RoPE)")
        if self.n_heads % self.num_kv_heads:
            raise ValueError(f"n_kv_heads: {self.num_kv_heads} does not divide n_heads={self.n_heads}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"embedding_size: {self.embedding_size} is smaller than vocab_size={self.vocab_size}")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None or name == "mask_token_id":
                check_int(name, value)
                if not 0 <= value < self.padded_vocab_size:
                    raise ValueError(f"{name}: {value} is outside the embedding ({self.padded_vocab_size} rows)")

    @property
    def num_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and of the LM head."""
        return self.vocab_size if self.embedding_size is None else self.embedding_size

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "LLaDAConfig":
        """Read LLaDA's ``config.json`` fields; unknown fields (``auto_map``, ``architectures``...) are ignored."""
        for name, supported in _SUPPORTED_VARIANT.items():
            if name in config and config[name] != supported:
                raise ValueError(
                    f"{name}: {config[name]!r} is not supported (bgpo's LLaDA implements {name}={supported!r}, "
                    "the released LLaDA architecture); load other variants with bgpo.models.HFMaskedDiffusionAdapter"
                )
        if config.get("bias_for_layer_norm"):
            raise ValueError("bias_for_layer_norm: RMSNorm with a bias is not supported")
        n_kv_heads = config.get("n_kv_heads")
        if n_kv_heads is None and config.get("multi_query_attention"):
            n_kv_heads = 1
        mlp_hidden_size = config.get("mlp_hidden_size")
        if mlp_hidden_size is None:
            mlp_hidden_size = config.get("mlp_ratio", 4) * config["d_model"]
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {name: config[name] for name in fields if name in config}
        values.update(n_kv_heads=n_kv_heads, mlp_hidden_size=mlp_hidden_size)
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "LLaDAConfig":
        """Read a ``config.json`` file, or the ``config.json`` of a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The fields under LLaDA's names, architecture switches included (``from_dict`` reads it back)."""
        return {**_SUPPORTED_VARIANT, **dataclasses.asdict(self), "model_type": "llada"}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LLaDAConfig":
        """A named shape: ``"tiny"`` (tests, demos), ``"small"`` (CPU benchmarks), ``"llada-8b"`` (LLaDA-8B)."""
        if name not in _PRESETS:
            raise ValueError(f"name: unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
        return dataclasses.replace(_PRESETS[name], **overrides)


_PRESETS = {
    # Two layers, 4 heads of 16, a 128-token vocabulary whose last ids are EOS and MASK: a forward
    # pass on a few sequences takes milliseconds on a CPU.
    "tiny": LLaDAConfig(
        d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=192, vocab_size=128, rope_theta=10000.0,
        max_sequence_length=512, mask_token_id=127, eos_token_id=126, pad_token_id=126,
    ),
    # LLaDA-8B's proportions scaled down: MLP = 3 * d_model, vocabulary = 32 * d_model, head size 64.
    "small": LLaDAConfig(
        d_model=256, n_layers=4, n_heads=4, mlp_hidden_size=768, vocab_size=8192, rope_theta=500000.0,
        max_sequence_length=2048, mask_token_id=8191, eos_token_id=8190, pad_token_id=8190,
    ),
    # GSAI-ML/LLaDA-8B-Instruct (and -Base): SPEC section 6.
    "llada-8b": LLaDAConfig(
        d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464,
        embedding_size=126464, rope_theta=500000.0, max_sequence_length=4096,
        mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
    ),
}
