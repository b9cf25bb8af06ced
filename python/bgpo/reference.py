"""Naive references of the fused op: full logits, plain autograd.  The specification the tests check
every backend against; they materialise (B, L, V) logits and are only for small shapes."""
from __future__ import annotations

import torch.nn.functional as F

from . import objectives
from .estimators import elbo_from_logits
from .ops.fused_elbo_loss import ElboLoss

__all__ = ["fused_elbo_reference", "fused_elbo_loss_reference"]


def fused_elbo_reference(hidden, weight, targets, masked, elbo_weight, *, bias=None, softcap=None):
    """ℓ (B,) from full logits ``hidden @ weightᵀ + bias``, computed in the inputs' dtype."""
    return elbo_from_logits(F.linear(hidden, weight, bias), targets, masked, elbo_weight, softcap)


def fused_elbo_loss_reference(hidden, weight, targets, masked, elbo_weight, advantages, old_elbo=None, *,
                              num_samples=1, denom=None, bias=None, objective="bgpo", clip=None,
                              max_log_ratio=objectives.MAX_LOG_RATIO, ref_elbo=None, beta=0.0,
                              softcap=None) -> ElboLoss:
    """``fused_elbo_loss`` computed the naive way."""
    elbo = fused_elbo_reference(hidden, weight, targets, masked, elbo_weight, bias=bias, softcap=softcap)
    loss = objectives.per_sample_loss(elbo, advantages, old_elbo, objective=objective, num_samples=num_samples,
                                      denom=denom, clip=clip, max_log_ratio=max_log_ratio, ref_elbo=ref_elbo,
                                      beta=beta)
    return ElboLoss(loss, elbo.detach())
