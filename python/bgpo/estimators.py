"""Estimators: the ELBO term from logits, per-token log-probs, group advantages, the one-step mask.

``elbo_from_logits`` is the readable definition of the per-sample ELBO term (SPEC §1); the fused op
computes the same quantity without the logits.
"""
from __future__ import annotations

import torch

from . import philox
from .ops._checks import check_device, check_int, check_real, check_shape, check_tensor, check_values
from .ops.random_mask import column_offsets

__all__ = ["elbo_from_logits", "token_logprobs", "group_advantages", "one_step_mask", "STD_MODES"]

STD_MODES = ("unbiased", "population", "none")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """(B, L) fp32 ``log softmax(logits)[target]`` (optionally after ``softcap * tanh(z / softcap)``)."""
    check_tensor("logits", logits)
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits: expected a floating-point tensor, got {logits.dtype}")
    check_tensor("targets", targets, integer=True)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:-1])} (the logits' without the vocabulary), "
                         f"got {tuple(targets.shape)}")
    z = logits.float()
    if softcap is not None:
        check_real("softcap", softcap, positive=True)
        z = softcap * torch.tanh(z / softcap)
    return z.log_softmax(dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def elbo_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    elbo_weight: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """(B,) fp32 ``ℓ_b = w_b Σ_{i masked} log p(y_i | noisy input)`` from full logits (B, L, V)."""
    logp = token_logprobs(logits, targets, softcap)
    return (logp * masked).sum(dim=1) * elbo_weight.float()


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, std: str = "unbiased", eps: float = 1e-6
) -> torch.Tensor:
    """``A_k = (r_k - mean_G r) / (std_G r + eps)`` over contiguous groups of ``group_size`` (paper Eq. 18).

    ``std``: ``"unbiased"`` (default), ``"population"`` or ``"none"`` (no division).  A group whose
    rewards are all equal gets A = 0 exactly (also for group_size 1).
    """
    check_tensor("rewards", rewards, dims=1)
    check_int("group_size", group_size, low=1)
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards: length {rewards.shape[0]} is not a multiple of group_size={group_size}")
    if std not in STD_MODES:
        raise ValueError(f"std: expected one of {STD_MODES}, got {std!r}")
    check_real("eps", eps, nonnegative=True)  # eps < 0 could flip a group's signs (std < -eps)
    check_values("rewards", torch.isfinite(rewards), "finite values")
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if std != "none" and group_size > 1:
        centred = centred / (grouped.std(dim=1, correction=int(std == "unbiased"), keepdim=True) + eps)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return centred.masked_fill(constant, 0.0).reshape(-1).to(torch.float32)


def one_step_mask(
    input_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mask_id: int,
    seed: int,
    iteration: int = 0,
    sequence_ids: torch.Tensor | None = None,
    prompt_mask_prob: float = 0.15,
) -> torch.Tensor:
    """diffu-GRPO's one-step noisy input: every response token masked, each prompt token with p = 0.15.

    The prompt draws use the column stream of ``random_mask`` (SPEC §5) with sample index
    ``iteration`` (d1 re-draws the prompt mask at each of its μ inner iterations), so they too are
    reproducible from ``(seed, sequence id, iteration, column)``.
    """
    check_tensor("input_ids", input_ids, dims=2, integer=True)
    B, C = input_ids.shape
    for name, mask in (("prompt_mask", prompt_mask), ("response_mask", response_mask)):
        check_tensor(name, mask, dtype=torch.bool)
        check_shape(name, mask, (B, C))
        check_device(name, mask, input_ids)
    check_real("prompt_mask_prob", prompt_mask_prob, interval=(0, 1))
    check_int("iteration", iteration, low=0, high=2**15)
    check_int("mask_id", mask_id, low=0, high=torch.iinfo(input_ids.dtype).max + 1)
    check_int("seed", seed, low=-(2**63), high=2**63)
    if sequence_ids is None:
        sequence_ids = torch.arange(B, device=input_ids.device)
    u = philox.rand(seed, column_offsets(sequence_ids, iteration, C))
    masked = response_mask | (prompt_mask & (u < prompt_mask_prob))
    return input_ids.masked_fill(masked, mask_id)
