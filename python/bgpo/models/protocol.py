"""``MaskedDiffusionLM``: what the trainer and the sampler need from a model.

Both bgpo's ``LLaDAModelLM`` and ``HFMaskedDiffusionAdapter`` (any Hugging Face masked diffusion LM)
provide it.  The LM head is exposed as a matrix rather than applied, because the expensive part of
the loss is that head over the vocabulary: ``bgpo.fused_elbo_loss`` applies it on masked rows only,
tile by tile, without materialising logits.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["MaskedDiffusionLM"]


@runtime_checkable
class MaskedDiffusionLM(Protocol):
    """A bidirectional mask predictor ``p(x_0 | x_t)`` with an accessible LM head.

    * ``hidden_states(input_ids, attention_mask=None)`` -> (B, T, H): the final hidden states, after the
      final norm, already aligned so that row t predicts token t (the LM head is not applied).
    * ``logits(input_ids, attention_mask=None)`` -> (B, T, V): the same rows through the LM head.
    * ``lm_head_weight`` (V, H) and ``lm_head_bias`` (V,) or ``None``: the parameters themselves, so
      gradients computed against them reach the model.
    * ``mask_token_id``, ``eos_token_id`` (``None`` if unknown).
    * ``blocks``: the ``nn.ModuleList`` of transformer blocks (activation checkpointing, FSDP units).

    ``attention_mask`` is (B, T) with nonzero entries for real tokens (padding is zero).

    Optional, for ``bgpo.rollout.generate(cache=...)``: ``kv_cache_modes``, the caches offered
    (``("prefix", "dual")`` for ``LLaDAModelLM``; the adapter's depend on the model), ``new_kv_cache()``, and
    ``hidden_states`` taking ``kv_cache`` / ``cache_start`` as ``LLaDAModelLM.forward`` does.
    """

    mask_token_id: int
    eos_token_id: int | None

    @property
    def lm_head_weight(self) -> torch.Tensor: ...

    @property
    def lm_head_bias(self) -> torch.Tensor | None: ...

    @property
    def blocks(self) -> nn.ModuleList: ...

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...
