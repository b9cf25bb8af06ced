"""bgpo: memory-flat RL for masked diffusion LMs (BGPO, arXiv 2510.11683).

The public API: ``random_mask`` (reproducible MC samples of the masking process), ``fused_elbo_loss``
and ``fused_elbo`` (the per-sample ELBO term and loss from hidden states and the LM head, never
materialising logits), the objectives of ``bgpo.objectives`` and the estimators of ``bgpo.estimators``.
"""
from . import objectives
from .estimators import elbo_from_logits, group_advantages, one_step_mask, token_logprobs
from .objectives import bgpo_loss, diffu_grpo_loss, spg_loss, vrpo_loss, wd1_loss
from .ops.fused_elbo_loss import ElboLoss, fused_elbo, fused_elbo_loss
from .ops.random_mask import MaskedSample, random_mask

__version__ = "0.1.0"

__all__ = [
    "random_mask",
    "MaskedSample",
    "fused_elbo_loss",
    "fused_elbo",
    "ElboLoss",
    "group_advantages",
    "one_step_mask",
    "elbo_from_logits",
    "token_logprobs",
    "objectives",
    "bgpo_loss",
    "vrpo_loss",
    "diffu_grpo_loss",
    "spg_loss",
    "wd1_loss",
]

from . import _extensions

_extensions.load()
