"""Rotary position embeddings (RoPE) as LLaDA applies them: "rotate half" layout, computed in fp32.

For head size d and position p, channel pair (i, i + d/2) is rotated by the angle p * theta^(-2i/d).
LLaDA (like Llama) pairs channel i with channel i + d/2 (not adjacent channels), so

    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1],

with ``cos``/``sin`` of shape (T, d) holding the angles twice, ``[angles, angles]``.  LLaDA computes
this in fp32 whatever the model dtype (``rope_full_precision``); so do we.

The tables are rebuilt at every forward from the positions (a (T, d/2) outer product, negligible next
to the model) instead of being cached in buffers: the model then has no buffers, builds on the meta
device and shards with FSDP without special cases.
"""
from __future__ import annotations

import torch

__all__ = ["rotary_tables", "apply_rotary"]


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each of shape ``positions.shape + (head_dim,)``, in fp32."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (B, T, heads, d); ``cos``/``sin`` are (T, d) or (B, T, d)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x32 = x.to(torch.float32)
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)
