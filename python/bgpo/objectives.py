"""RL objectives over per-sample ELBO terms (SPEC §2, §3).  Every loss is to be *minimised*.

Notation: for one response, MC sample j has the ELBO term ℓ_j (differentiable, under θ) and ℓ_j^old
(a constant, under θ_old, on the same noisy sample); ``d_j = ℓ_j - ℓ_j^old``; A is the group
advantage; n_t the number of MC samples; D the number of responses the loss averages over.

* ``bgpo_bound``/``bgpo_loss`` — the paper's linear lower bound, one sample at a time::

      g_j = (1 + d_j) A / n_t     if A >= 0      (e^δ >= 1 + δ: the tangent at 0)
      g_j = e^{d_j}   A / n_t     if A <  0      (Jensen: e^{mean d} <= mean e^d, times A < 0)

  Σ_j g_j <= exp(mean_j d_j) A for every d and A, with equality of value *and* gradient at d = 0
  (on-policy): both are A and (A/n_t) Σ_j ∇ℓ_j.  ∂g_j/∂ℓ_j = A/n_t (A >= 0) or A e^{d_j}/n_t (A < 0):
  the per-sample bound weight c_j that ``fused_elbo_loss`` folds into its backward.
* ``vrpo_loss`` — VRPO-OL, ``exp(mean_j d_j) A``: non-linear in the samples, so all n_t graphs live
  until backward (the memory BGPO removes).
* ``diffu_grpo_loss`` — d1's one-step estimator: token-level clipped ratio and k3 KL.
* ``spg_loss`` — SPG: ELBO for A > 0, an upper bound (EUBO) or a mixture for A <= 0.
* ``wd1_loss`` — wd1: ``-Σ softmax_G(A) log π + Σ softmax_G(-A) log π``, no ratio.

* ``elbo_kl`` — the optional KL penalty to a reference policy for the ELBO objectives: k3 of the
  ELBO log-ratio of each MC sample, ``e^x - x - 1`` with ``x_j = ℓ_j^ref - ℓ_j`` (the estimator GRPO uses
  per token, here per sequence with the ELBO standing in for the log-likelihood, as in the ratio).
  One term per sample, so it accumulates like BGPO.  Its gradient coefficient on ∇ℓ_j is
  ``β (1 - e^{x_j}) / n_t``: it pulls ℓ_j up where the policy has fallen below the reference and down
  where it has risen above it.

Options shared with the public ports, defaults = the paper: ``clip=(ε_low, ε_high)`` applies PPO's
``min(ρA, clip(ρ, 1-ε_low, 1+ε_high) A)`` to the ratio ρ (1 + d or e^d); off by default.
``max_log_ratio`` clamps d (or mean d) before every exponential, default ``MAX_LOG_RATIO`` = 10
(e^10 ≈ 2.2e4): it prevents overflow when a sequence's log-likelihood has moved far; beyond it the
gradient of that term is zero (the KL's k3 is continued linearly there instead: see ``elbo_kl``).  A KL term is off by default (``beta`` = 0; ``ref_elbo`` and ``beta``
for the ELBO objectives, ``ref_logp`` and ``beta`` in diffu-GRPO).
"""
from __future__ import annotations

import math

import torch

from .ops._checks import check_int, check_real, check_values

__all__ = [
    "MAX_LOG_RATIO",
    "bgpo_bound",
    "bgpo_loss",
    "elbo_pg_loss",
    "elbo_kl",
    "k3",
    "per_sample_loss",
    "vrpo_loss",
    "diffu_grpo_loss",
    "spg_loss",
    "wd1_weights",
    "wd1_loss",
]

MAX_LOG_RATIO = 10.0


def _check_clip(clip) -> tuple[float, float] | None:
    if clip is None:
        return None
    if isinstance(clip, (str, bytes)) or not hasattr(clip, "__len__") or len(clip) != 2:
        raise ValueError(f"clip: expected None or a pair (eps_low, eps_high), got {clip!r}")
    low, high = clip
    for value in clip:
        check_real("clip", value, nonnegative=True)
    if not low < 1.0:
        raise ValueError(f"clip: expected 0 <= eps_low < 1 and eps_high >= 0, got {clip!r}")
    return float(low), float(high)


def _check_denom(denom, batch: int) -> float:
    if denom is None:
        return float(max(batch, 1))
    check_real("denom", denom, positive=True)  # D: the responses the loss averages over
    return float(denom)


def _check_num_samples(num_samples) -> int:
    check_int("num_samples", num_samples, low=1)
    return num_samples


def _check_max_log_ratio(max_log_ratio) -> None:
    if max_log_ratio is not None:
        check_real("max_log_ratio", max_log_ratio, positive=True)


def _check_elbo(elbo) -> torch.Tensor:
    """ℓ (B,): a 1-D floating-point tensor (it carries the gradient, so its values are not read)."""
    if not isinstance(elbo, torch.Tensor) or elbo.dim() != 1 or not elbo.dtype.is_floating_point:
        raise ValueError(f"elbo: expected a 1-D floating-point tensor (one ELBO term per response), got "
                         f"{getattr(elbo, 'shape', type(elbo).__name__)} {getattr(elbo, 'dtype', '')}".rstrip())
    return elbo.float()


def _check_vector(name: str, value, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)}, got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device}, got one on {value.device}")
    if not value.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    check_values(name, torch.isfinite(value), "finite values")
    return value.float()


def _clamp_max(x: torch.Tensor, max_log_ratio: float | None) -> torch.Tensor:
    return x if max_log_ratio is None else x.clamp(max=max_log_ratio)


def _clipped(ratio: torch.Tensor, advantages: torch.Tensor, clip) -> torch.Tensor:
    """PPO's pessimistic surrogate min(ρA, clip(ρ)A), or ρA without clipping."""
    surrogate = ratio * advantages
    if clip is None:
        return surrogate
    low, high = clip
    return torch.minimum(surrogate, ratio.clamp(1.0 - low, 1.0 + high) * advantages)


def bgpo_bound(
    elbo: torch.Tensor,
    advantages: torch.Tensor,
    old_elbo: torch.Tensor | None = None,
    *,
    num_samples: int,
    clip: tuple[float, float] | None = None,
    max_log_ratio: float | None = MAX_LOG_RATIO,
) -> torch.Tensor:
    """(B,) the bound terms g_j of one MC sample (to be maximised); ``old_elbo=None`` means on-policy."""
    num_samples = _check_num_samples(num_samples)
    clip = _check_clip(clip)
    _check_max_log_ratio(max_log_ratio)
    elbo = _check_elbo(elbo)
    advantages = _check_vector("advantages", advantages, elbo)
    old = elbo.detach() if old_elbo is None else _check_vector("old_elbo", old_elbo, elbo)
    d = elbo - old
    positive = advantages >= 0
    # The exponential only sees d where A < 0, so a large d of an A >= 0 row cannot overflow into
    # a NaN gradient through torch.where.
    exp_branch = torch.exp(_clamp_max(torch.where(positive, torch.zeros_like(d), d), max_log_ratio))
    ratio = torch.where(positive, 1.0 + d, exp_branch)
    return _clipped(ratio, advantages, clip) / num_samples


def bgpo_loss(elbo, advantages, old_elbo=None, *, num_samples, denom=None, clip=None,
              max_log_ratio=MAX_LOG_RATIO) -> torch.Tensor:
    """``-(1/D) Σ_b g_b``: the loss of one MC sample; the n_t losses of a batch sum to its BGPO loss."""
    bound = bgpo_bound(elbo, advantages, old_elbo, num_samples=num_samples, clip=clip, max_log_ratio=max_log_ratio)
    return -bound.sum() / _check_denom(denom, bound.shape[0])


def elbo_pg_loss(elbo, advantages, *, num_samples, denom=None) -> torch.Tensor:
    """``-(1/D) Σ_b A_b ℓ_b / n_t``: the linear ELBO policy gradient of one MC sample."""
    num_samples = _check_num_samples(num_samples)
    elbo = _check_elbo(elbo)
    advantages = _check_vector("advantages", advantages, elbo)
    return -(advantages * elbo).sum() / (num_samples * _check_denom(denom, elbo.shape[0]))


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """Schulman's KL estimator ``e^x - x - 1 >= 0`` of ``x = log π_ref - log π`` (elementwise)."""
    return torch.exp(log_ratio) - log_ratio - 1.0


def elbo_kl(elbo, ref_elbo, *, num_samples, denom=None, max_log_ratio=MAX_LOG_RATIO) -> torch.Tensor:
    """``(1/(n_t D)) Σ_b k3(ℓ_b^ref - ℓ_b)``: one MC sample's share of the KL to the reference policy.

    ``k3(x) = e^x - x - 1 >= 0``.  Beyond x = c = ``max_log_ratio`` (the policy's ℓ more than c nats below
    the reference's) k3 is continued by its tangent at c, ``k3(c) + (e^c - 1)(x - c)``: finite, and its
    gradient stays e^c - 1 > 0, so the KL keeps pulling the policy back where it has drifted furthest (a
    clamp there would make the gradient 0).
    """
    num_samples = _check_num_samples(num_samples)
    _check_max_log_ratio(max_log_ratio)
    elbo = _check_elbo(elbo)
    x = _check_vector("ref_elbo", ref_elbo, elbo) - elbo
    inside = _clamp_max(x, max_log_ratio)
    kl = k3(inside) + (torch.exp(inside) - 1.0) * (x - inside)  # x - inside = 0 up to c
    return kl.sum() / (num_samples * _check_denom(denom, elbo.shape[0]))


def _check_kl(name: str, ref, beta) -> bool:
    """True when a KL term is asked for; ValueError when ``beta`` and ``ref`` do not go together."""
    check_real("beta", beta, nonnegative=True)  # the KL coefficient
    if beta > 0 and ref is None:
        raise ValueError(f"{name}: required when beta > 0 (the k3 KL is to the reference policy)")
    return beta > 0


def per_sample_loss(elbo, advantages, old_elbo=None, *, objective, num_samples, denom=None, clip=None,
                    max_log_ratio=MAX_LOG_RATIO, ref_elbo=None, beta=0.0) -> torch.Tensor:
    """The loss of one MC sample for the objectives that are linear in the samples (``bgpo``, ``elbo``),
    plus ``beta * elbo_kl(elbo, ref_elbo)`` when ``beta > 0``."""
    if objective == "bgpo":
        loss = bgpo_loss(elbo, advantages, old_elbo, num_samples=num_samples, denom=denom, clip=clip,
                         max_log_ratio=max_log_ratio)
    elif objective == "elbo":
        if old_elbo is not None or clip is not None:
            raise ValueError("objective: 'elbo' takes neither old_elbo nor clip (it has no ratio); use 'bgpo'")
        loss = elbo_pg_loss(elbo, advantages, num_samples=num_samples, denom=denom)
    else:
        raise ValueError(f"objective: expected 'bgpo' or 'elbo' (the per-sample objectives), got {objective!r}")
    if _check_kl("ref_elbo", ref_elbo, beta):
        loss = loss + beta * elbo_kl(elbo, ref_elbo, num_samples=num_samples, denom=denom,
                                     max_log_ratio=max_log_ratio)
    return loss


def vrpo_loss(
    elbos: torch.Tensor,
    advantages: torch.Tensor,
    old_elbos: torch.Tensor | None = None,
    *,
    denom: float | None = None,
    clip: tuple[float, float] | None = None,
    max_log_ratio: float | None = MAX_LOG_RATIO,
    ref_elbos: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """VRPO-OL: ``-(1/D) Σ_b exp(mean_j d_bj) A_b`` over stacked per-sample terms ``elbos`` (n_t, B), plus
    ``beta`` times the KL of ``elbo_kl`` summed over the samples when ``beta > 0``."""
    clip = _check_clip(clip)
    _check_max_log_ratio(max_log_ratio)
    if not isinstance(elbos, torch.Tensor) or elbos.dim() != 2:
        raise ValueError(f"elbos: expected a (n_t, B) tensor, got {getattr(elbos, 'shape', type(elbos))}")
    elbos = elbos.float()
    advantages = _check_vector("advantages", advantages, elbos[0])
    old = elbos.detach() if old_elbos is None else _check_vector("old_elbos", old_elbos, elbos)
    mean_d = (elbos - old).mean(dim=0)
    ratio = torch.exp(_clamp_max(mean_d, max_log_ratio))
    loss = -_clipped(ratio, advantages, clip).sum() / _check_denom(denom, elbos.shape[1])
    if _check_kl("ref_elbos", ref_elbos, beta):
        loss = loss + beta * sum(elbo_kl(e, r, num_samples=len(elbos), denom=denom, max_log_ratio=max_log_ratio)
                                 for e, r in zip(elbos, _check_vector("ref_elbos", ref_elbos, elbos)))
    return loss


def diffu_grpo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    clip_eps: float = 0.5,
    beta: float = 0.04,
    denom: float | None = None,
) -> torch.Tensor:
    """diffu-GRPO (d1): per-token log-probs (B, T) of the one-step estimator (``bgpo.one_step_mask``).

    Per token ``ρ = exp(logp - old_logp)``, surrogate ``min(ρA, clip(ρ, 1-ε, 1+ε)A)``, k3 KL to the
    reference ``exp(ref - logp) - (ref - logp) - 1``; per-token loss ``-(surrogate - β KL)``, averaged
    over each response's tokens, summed over responses and divided by D.  ``ref_logp`` is required
    when ``beta > 0``.
    """
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2:
        raise ValueError(f"logp: expected a (B, T) tensor of per-token log-probs, got {getattr(logp, 'shape', logp)}")
    if (not isinstance(response_mask, torch.Tensor) or response_mask.dtype != torch.bool
            or response_mask.shape != logp.shape):  # a float mask would silently weigh tokens
        raise ValueError(f"response_mask: expected a bool tensor of shape {tuple(logp.shape)}, got "
                         f"{getattr(response_mask, 'dtype', type(response_mask).__name__)} "
                         f"{tuple(getattr(response_mask, 'shape', ()))}")
    check_real("clip_eps", clip_eps, interval=(0, 1), ends="()")
    use_kl = _check_kl("ref_logp", ref_logp, beta)
    logp = logp.float()
    advantages = _check_vector("advantages", advantages, logp[:, 0]).unsqueeze(1)
    old = logp.detach() if old_logp is None else _check_vector("old_logp", old_logp, logp)
    ratio = torch.exp(logp - old)
    per_token = -_clipped(ratio, advantages, (clip_eps, clip_eps))
    if use_kl:
        delta = _check_vector("ref_logp", ref_logp, logp) - logp
        per_token = per_token + beta * k3(delta)
    weights = response_mask.float()
    per_response = (per_token * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    return per_response.sum() / _check_denom(denom, logp.shape[0])


SPG_NEGATIVE = ("eubo", "mixture", "elbo")


def spg_loss(
    elbos: torch.Tensor,
    advantages: torch.Tensor,
    *,
    negative: str = "mixture",
    beta: float = 1.0,
    mix_weight: float = 0.5,
    denom: float | None = None,
) -> torch.Tensor:
    """SPG: ``-(1/D) Σ_b A_b log p̂_b`` over stacked per-sample terms ``elbos`` (n_t, B).

    ``log p̂`` is the ELBO ``mean_j ℓ_j`` where A > 0 (a lower bound, pushed up) and, where A <= 0 (pushed
    down), the EUBO ``(1/β) log mean_j exp(β ℓ_j)`` (``negative="eubo"``), the mixture
    ``w·EUBO + (1-w)·ELBO`` (``"mixture"``, default, w = 0.5) or the ELBO (``"elbo"``).
    """
    if negative not in SPG_NEGATIVE:
        raise ValueError(f"negative: expected one of {SPG_NEGATIVE}, got {negative!r}")
    check_real("beta", beta, positive=True)
    check_real("mix_weight", mix_weight, interval=(0, 1))
    if not isinstance(elbos, torch.Tensor) or elbos.dim() != 2:
        raise ValueError(f"elbos: expected a (n_t, B) tensor, got {getattr(elbos, 'shape', type(elbos))}")
    elbos = elbos.float()
    advantages = _check_vector("advantages", advantages, elbos[0])
    lower = elbos.mean(dim=0)
    upper = (torch.logsumexp(beta * elbos, dim=0) - math.log(elbos.shape[0])) / beta
    pushed_down = {"eubo": upper, "mixture": mix_weight * upper + (1.0 - mix_weight) * lower, "elbo": lower}[negative]
    log_p = torch.where(advantages > 0, lower, pushed_down)
    return -(advantages * log_p).sum() / _check_denom(denom, elbos.shape[1])


def wd1_weights(advantages: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) ``softmax_G(A) - softmax_G(-A)`` over each contiguous group of ``group_size`` responses."""
    check_int("group_size", group_size, low=1)
    if group_size == 1:  # softmax over one response is 1: every weight would be 0, and so the gradient
        raise ValueError("group_size: wd1 weighs responses against the others of their prompt's group; expected "
                         "at least 2 responses per prompt, got 1")
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages: expected a torch.Tensor, got {type(advantages).__name__}")
    if advantages.dim() != 1 or advantages.shape[0] % group_size:
        raise ValueError(
            f"advantages: expected a 1-D tensor whose length is a multiple of group_size={group_size}, "
            f"got shape {tuple(advantages.shape)}"
        )
    grouped = _check_vector("advantages", advantages, advantages).view(-1, group_size)
    return (grouped.softmax(dim=1) - (-grouped).softmax(dim=1)).reshape(-1)


def wd1_loss(elbo, advantages, *, group_size: int, num_samples: int = 1) -> torch.Tensor:
    """wd1 on one MC sample's ℓ (N,): ``-(1/P) Σ_groups Σ_i (softmax_G(A) - softmax_G(-A))_i ℓ_i / n_t``.

    P = N / group_size prompts; linear in the samples, so it accumulates like BGPO.
    """
    num_samples = _check_num_samples(num_samples)
    weights = wd1_weights(advantages, group_size)
    elbo = _check_elbo(elbo)
    if elbo.shape != advantages.shape:  # a (1,) elbo would broadcast, and the weights of a group sum to 0
        raise ValueError(f"elbo: expected shape {tuple(advantages.shape)} (one term per advantage), "
                         f"got {tuple(elbo.shape)}")
    prompts = advantages.shape[0] // group_size
    return -(weights * elbo).sum() / (num_samples * prompts)
