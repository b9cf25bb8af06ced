"""Packed sequences: the real tokens of a padded batch back to back in one row, padding dropped.

A padded batch (R, W) with a boolean ``keep`` (R, W) (True = a real token: the attention mask) becomes one
row of T = Σ keep tokens, sequence r occupying rows ``cu_seqlens[r] .. cu_seqlens[r + 1] - 1`` in its
original order.  The model attends within each sequence only (``bgpo.models.attention``), so no compute
is spent on padding.

Why this is *exact* (the packed forward equals the padded forward at every kept token):

* Attention.  In the padded forward the padding is hidden as keys, so a kept token's softmax runs over
  the kept keys of its own row: the same set the packed forward gives it.  Padding queries do not feed
  any kept token (keys are masked), so dropping them changes nothing that is kept.
* Positions.  Each kept token keeps its column in the padded row as its position (``position_ids``).
  RoPE scores depend only on q_pos - k_pos, and those are the padded forward's.
* Everything else (embedding, norms, MLP, LM head) acts on each token alone.

So the ELBO terms, losses and gradients agree to floating-point summation order (fp32 tolerance).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops._checks import check_shape, check_tensor

__all__ = ["Packing", "pack", "keep_mask", "segment_ids", "supports_packing"]


@dataclass(frozen=True)
class Packing:
    """Where the kept tokens of a padded (R, W) batch go in the packed row."""

    index: torch.Tensor  # (T,) flat indices into R * W of the kept tokens, row-major
    cu_seqlens: torch.Tensor  # (R + 1,) int32 offsets of each row's tokens in the packed row
    position_ids: torch.Tensor  # (1, T) each kept token's column in the padded batch
    max_seqlen: int  # the longest sequence, for flash-attn's varlen kernel

    def gather(self, padded: torch.Tensor) -> torch.Tensor:
        """The kept entries of ``padded`` (R, W, ...) in packed order: (T, ...)."""
        return padded.reshape(-1, *padded.shape[2:])[self.index]

    def model_inputs(self) -> dict:
        """The packing keywords of ``hidden_states`` (``bgpo.models.llada.LLaDAModelLM.forward``)."""
        return dict(cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen, position_ids=self.position_ids)


def pack(keep: torch.Tensor) -> Packing:
    """The ``Packing`` of the True entries of ``keep`` (R, W) bool; one host synchronisation (T)."""
    check_tensor("keep", keep, dims=2, dtype=torch.bool)
    lengths = keep.sum(dim=1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    index = keep.reshape(-1).nonzero().squeeze(1)
    return Packing(index=index, cu_seqlens=cu_seqlens, position_ids=(index % keep.shape[1]).unsqueeze(0),
                   max_seqlen=int(lengths.max()) if len(lengths) else 0)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the sequence each of the ``total`` packed rows belongs to, shape (total,)."""
    rows = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(rows.dtype), rows, right=True)


def supports_packing(model) -> bool:
    """Whether ``model.hidden_states`` takes the packing keywords (bgpo's LLaDA does, the HF adapter not)."""
    return bool(getattr(model, "supports_packing", False))


def keep_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(R, W) bool: the tokens a padded forward lets others attend to (all of them without a mask)."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    check_shape("attention_mask", attention_mask, tuple(input_ids.shape))
    return attention_mask.bool()
