"""A clean implementation of LLaDA: a Llama-style transformer without a causal mask.

Per block (pre-norm, residual):

    h = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),   n = RMSNorm(x)
    y = h + down_proj(silu(gate_proj(m)) * up_proj(m)),                        m = RMSNorm(h)

then a final RMSNorm and the LM head.  This is LLaDA's ``LLaDALlamaBlock`` (names mapped in
``bgpo.models.loading``): its ``ff_proj`` is the SwiGLU gate, ``up_proj`` the up projection and
``ff_out`` the down projection.  Numerics follow LLaDA's: RMSNorm normalises in fp32 and casts back
before the weight, RoPE runs in fp32.

``forward`` returns the final hidden states (after the final norm), not logits: the trainer applies
the LM head itself, on masked rows only (``bgpo.fused_elbo_loss``).  ``logits`` applies it for
sampling and references.  Keeping the hidden states the output of ``__call__`` lets wrappers that
hook ``__call__`` (FSDP2's ``fully_shard``, activation checkpointing) see the whole backbone.

The model holds no buffers and allocates nothing at construction beyond its parameters, so
``with torch.device("meta"): LLaDAModelLM(LLaDAConfig.preset("llada-8b"))`` builds an 8B model
without memory; ``from_pretrained`` builds on meta and assigns the checkpoint tensors directly.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._checks import check_cu_seqlens, check_shape, check_tensor
from ..packing import segment_ids
from .attention import KVCache, attend
from .config import LLaDAConfig
from .rotary import apply_rotary, rotary_tables

__all__ = ["LLaDAModelLM", "LLaDABlock", "RMSNorm"]


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in fp32 (LLaDA's ``RMSLayerNorm``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) bidirectional self-attention with RoPE."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.num_kv_heads, config.head_dim
        qkv_bias = config.include_bias or config.include_qkv_bias
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=config.include_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv=None, **mask) -> torch.Tensor:
        """``kv``: this layer's ``KVCache.update`` (bound to the layer and the slice start), or None."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv is not None:
            k, v = kv(k, v)
        out = attend(q, k, v, **mask)
        return self.o_proj(out.reshape(batch, length, -1))


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=config.include_bias)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=config.include_bias)
        self.down_proj = nn.Linear(config.mlp_hidden_size, config.d_model, bias=config.include_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDABlock(nn.Module):
    """One pre-norm transformer block (LLaDA's ``LLaDALlamaBlock``)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.attn = SelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv=None, **mask) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, kv, **mask)
        return x + self.mlp(self.mlp_norm(x))


class LLaDAModelLM(nn.Module):
    """LLaDA, implementing bgpo's ``MaskedDiffusionLM`` protocol.

    Parameters: ``embed``, ``blocks.{i}.{attn_norm, attn.{q,k,v,o}_proj, mlp_norm, mlp.{gate,up,down}_proj}``,
    ``norm`` and ``lm_head`` (absent with ``weight_tying``: the LM head is then the embedding).
    """

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = (
            None if config.weight_tying
            else nn.Linear(config.d_model, config.padded_vocab_size, bias=config.include_bias)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation: N(0, init_std) matrices, zero biases, unit norm weights."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    # ------------------------------------------------------------------ protocol
    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.config.eos_token_id

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H): the LM head, or the embedding matrix when the weights are tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return None if self.lm_head is None else self.lm_head.bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_start: int | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, d_model), after the final norm.

        ``attention_mask`` (B, T), nonzero = real token: padding is hidden from every query.  Positions
        are 0..T-1 regardless of padding: attention scores under RoPE depend only on the difference of
        two positions, so a left-padded sequence gives the same result as the unpadded one.
        ``cu_seqlens`` (with B = 1) packs several sequences in one row, see ``bgpo.models.attention``;
        each attends only to itself and restarts at position 0, or takes ``position_ids`` (1, T) (e.g. the
        tokens' columns in the padded batch they were gathered from: under RoPE the result then equals
        the padded forward's at those tokens, whatever padding was dropped; see ``bgpo.packing``).

        ``kv_cache`` (a ``KVCache``, sampling only): without ``cache_start`` the forward stores every
        layer's keys and values in it; with ``cache_start=s`` the ``input_ids`` (B, n) are the tokens at
        positions s .. s+n-1 of the cached sequence, their keys and values replace the cached ones and
        they attend to the whole cached sequence (``attention_mask`` is then the whole sequence's (B, T)).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a 2-D (batch, length) tensor, got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        mask: dict = {}
        if cache_start is not None:
            if kv_cache is None:
                raise ValueError("cache_start: needs a kv_cache")
            if isinstance(cache_start, bool) or not isinstance(cache_start, int) or cache_start < 0:
                raise ValueError(f"cache_start: expected an int >= 0, got {cache_start!r}")
            positions = positions + cache_start
        if kv_cache is not None and cu_seqlens is not None:
            raise ValueError("kv_cache: not supported with cu_seqlens (the cache is for padded sampling batches)")
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask: cannot be combined with cu_seqlens (packed rows have no padding)")
            if input_ids.shape[0] != 1:
                raise ValueError(f"cu_seqlens: packed input must be one row, got batch {input_ids.shape[0]}")
            check_cu_seqlens("cu_seqlens", cu_seqlens, length, input_ids.device)
            if position_ids is None:
                positions = positions - cu_seqlens.to(positions.dtype)[segment_ids(cu_seqlens, length)]
            else:
                check_tensor("position_ids", position_ids, integer=True)
                check_shape("position_ids", position_ids, (1, length))
                positions = position_ids[0]
            mask = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        elif position_ids is not None:
            raise ValueError("position_ids: only taken with cu_seqlens (padded rows use positions 0..T-1)")
        elif attention_mask is not None:
            expected = tuple(input_ids.shape)
            if cache_start is not None and kv_cache.keys:  # keys: the whole cached sequence
                expected = (input_ids.shape[0], kv_cache.keys[0].shape[1])
            if tuple(attention_mask.shape) != expected:
                raise ValueError(f"attention_mask: expected shape {expected}, got {tuple(attention_mask.shape)}")
            mask = dict(key_padding_mask=attention_mask.bool())
        rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(input_ids)
        for layer, block in enumerate(self.blocks):
            kv = None if kv_cache is None else functools.partial(kv_cache.update, layer, start=cache_start)
            x = block(x, rope, kv, **mask)
        return self.norm(x)

    #: ``bgpo.rollout.generate(cache=...)`` may pass ``kv_cache`` / ``cache_start`` to ``hidden_states``.
    kv_cache_modes = ("prefix", "dual")

    def new_kv_cache(self) -> KVCache:
        """An empty cache for one generation (``forward(..., kv_cache=)``)."""
        return KVCache()
    #: ``hidden_states`` takes ``cu_seqlens`` / ``max_seqlen`` / ``position_ids`` (``bgpo.packing``).
    supports_packing = True

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **cache) -> torch.Tensor:
        """What the LM head consumes, (B, T, d_model); calls the module (hooks run).  ``cache``:
        ``kv_cache`` / ``cache_start``, or the packing arguments ``cu_seqlens`` / ``max_seqlen`` /
        ``position_ids``, as in ``forward``."""
        return self(input_ids, attention_mask, **cache)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, V) logits over the padded vocabulary."""
        return F.linear(self(input_ids, attention_mask), self.lm_head_weight, self.lm_head_bias)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> "LLaDAModelLM":
        """Load a LLaDA checkpoint directory (``config.json`` + ``model.safetensors`` shards and index).

        The model is built on the meta device and the checkpoint tensors are assigned to it, converted
        to ``dtype`` (default: as stored) on ``device``: peak memory is one copy of the weights.
        """
        from .loading import load_llada_weights

        config = LLaDAConfig.from_json(path)
        with torch.device("meta"):
            model = cls(config)
        load_llada_weights(model, path, dtype=dtype, device=device)
        return model
