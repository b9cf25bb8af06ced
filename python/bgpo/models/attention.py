"""Bidirectional attention for masked diffusion LMs: every token attends to every (valid) token.

Two input layouts:

* **padded** batch (B, T) with an optional key padding mask (B, T), True = a real token.  Only keys
  are masked: a padding query still attends to the real tokens, so its row is finite (never the NaN
  of an all-masked softmax row) and is simply ignored by the caller.  Runs
  ``F.scaled_dot_product_attention``, which picks the flash / memory-efficient kernel on GPU.
* **packed** batch of one row holding several sequences back to back, delimited by ``cu_seqlens``
  (int32, ``[0, len_0, len_0 + len_1, ..., total]``); a token attends only within its sequence.  On CUDA
  in fp16/bf16 with flash-attn installed this is flash-attn's varlen kernel (no padding, no T x T mask);
  elsewhere SDPA runs on each sequence in turn: the same result as a block-diagonal mask (a token's
  softmax runs over its own sequence's keys only), without the O(T^2) mask or the cross-sequence
  scores: the score memory is the longest sequence's, the work Σ len_i^2.

Tensors are laid out (B, T, heads, head_dim), flash-attn's layout; grouped-query attention
(fewer KV heads) is handled by both paths without repeating K and V.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["attend", "flash_attn_varlen", "KVCache"]


@functools.cache
def flash_attn_varlen():
    """flash-attn's ``flash_attn_varlen_func``, or ``None`` when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


class KVCache:
    """Keys (after RoPE) and values of every layer over a whole (B, T) sequence: the sampler's
    approximate KV cache (Fast-dLLM).

    A forward without ``cache_start`` stores each layer's (B, T, kv_heads, head_dim) keys and values.
    A forward with ``cache_start=s`` on the tokens at positions s .. s+n-1 overwrites those n
    positions' keys and values with fresh ones and lets its queries attend to all T cached positions.
    The other positions keep the keys and values of the last full forward, computed from the sequence
    as it was then: that staleness is the approximation (without a causal mask, the keys of a finished
    block change when a later block is unmasked; a causal LM's would not).
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | None):
        """Keys and values (B, T, kv_heads, head_dim) that layer ``layer``'s queries attend to."""
        if start is None:
            if layer < len(self.keys):
                self.keys[layer], self.values[layer] = k, v
            else:
                self.keys.append(k)
                self.values.append(v)
            return k, v
        if layer >= len(self.keys):
            raise ValueError("kv_cache: empty; run a forward without cache_start first to fill it")
        keys, values = self.keys[layer], self.values[layer]
        end = start + k.shape[1]
        if keys.shape[0] != k.shape[0] or not 0 <= start < end <= keys.shape[1]:
            raise ValueError(
                f"cache_start: positions {start}..{end - 1} of a batch of {k.shape[0]} do not fit the cached "
                f"{keys.shape[0]} x {keys.shape[1]} positions"
            )
        keys[:, start:end] = k
        values[:, start:end] = v
        return keys, values


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Softmax attention without a causal mask; returns (B, T, heads, head_dim) like ``q``."""
    if cu_seqlens is not None:
        varlen = flash_attn_varlen()
        if varlen is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            cu = cu_seqlens.to(torch.int32)
            longest = max_seqlen if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
            out = varlen(q[0], k[0], v[0], cu, cu, longest, longest, dropout_p=0.0, causal=False)
            return out.unsqueeze(0)
        bounds = cu_seqlens.tolist()  # one host read per layer (the CPU path; flash-attn's takes none)
        pieces = [_sdpa(q[:, a:b], k[:, a:b], v[:, a:b], None) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(pieces, dim=1) if pieces else torch.empty_like(q)
    if key_padding_mask is not None:
        allowed = key_padding_mask[:, None, None, :]  # (B, 1, 1, T): mask keys only
    else:
        allowed = None
    return _sdpa(q, k, v, allowed)


def _sdpa(q, k, v, allowed):
    """SDPA on (B, T, heads, head_dim) tensors; ``allowed`` a boolean mask broadcastable to (B, heads, T, T)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=allowed,
        is_causal=False,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)
