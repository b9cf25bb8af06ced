"""The gradient of one RL update for a masked diffusion LM: MC samples drawn, forwarded, back-propagated.

``accumulate_policy_gradient`` leaves the gradient of the batch's loss in ``.grad`` (the caller steps
the optimizer).  How the graph is held is the point of the library:

* ``bgpo`` and ``wd1`` are linear in the MC samples: for each micro-batch and each sample j, one
  forward, ``fused_elbo_loss``, ``backward`` — the graph of sample j is freed before sample j+1, so
  peak memory does not grow with n_t.  With ``samples_per_forward = k`` the micro-batch is repeated k
  times with the masks of k consecutive samples (the same masks as k separate calls) and one forward
  and backward covers them: the loss is linear, so the sum over the k·B rows is the sum of the k
  samples' losses and the gradient is k = 1's; memory grows with k, never with n_t.
* ``vrpo`` and ``spg`` are not: the n_t graphs of a micro-batch live until one backward, so memory
  grows linearly with n_t (by design; they are here for comparison).
* ``diffu_grpo`` is d1's one-step estimator: one forward of the fully masked response (prompt tokens
  masked with p = 0.15), per-token log-probs from full logits; n_t does not apply.

With ``pack_sequences`` (bgpo, wd1, vrpo, spg; not diffu-GRPO's per-token path) each forward packs the
real tokens of its rows (those ``attention_mask`` keeps) into one row with ``cu_seqlens`` (``bgpo.packing``):
padding costs no compute.  The masks are drawn on the padded ids exactly as without packing and the kept
tokens gathered from them, so the ELBO terms, losses and gradients are the padded path's (fp32 tolerance).

Masks come from ``random_mask`` seeded by ``seed`` and the sequence ids, so the old policy's ELBO terms
(``old_policy_elbos``, computed once without grad before the first of μ updates) and every update
see the same noisy samples, regenerated rather than stored.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import objectives
from .estimators import one_step_mask, token_logprobs
from .ops._checks import check_bool, check_int, check_real, check_values, values_readable
from .ops.fused_elbo_loss import fused_elbo, fused_elbo_loss
from .ops.random_mask import random_mask
from .packing import keep_mask, pack, supports_packing

__all__ = ["PolicyBatch", "accumulate_policy_gradient", "old_policy_elbos", "old_policy_token_logprobs", "OBJECTIVES"]

OBJECTIVES = ("bgpo", "vrpo", "diffu_grpo", "spg", "wd1")
LINEAR_OBJECTIVES = ("bgpo", "wd1")  # one backward per MC sample (or per samples_per_forward of them)
# the objectives that read each optional argument of accumulate_policy_gradient (diffu_grpo's old
# per-token log-probs and clip range travel in diffu_grpo_options)
_READ_BY = {"old_elbos": ("bgpo", "vrpo"), "clip": ("bgpo", "vrpo"), "spg_options": ("spg",),
            "diffu_grpo_options": ("diffu_grpo",)}


@dataclass
class PolicyBatch:
    """N responses of one update.  Prompts are left-padded to a common length P; responses follow."""

    input_ids: torch.Tensor  # (N, P + T) prompt and response tokens
    prompt_length: int  # P
    response_mask: torch.Tensor  # (N, T) bool: valid response tokens (the ones the ELBO scores)
    advantages: torch.Tensor  # (N,) group advantages
    sequence_ids: torch.Tensor  # (N,) ids that seed each response's masks
    attention_mask: torch.Tensor | None = None  # (N, P + T), zero on prompt padding
    group_size: int = 1  # G: responses per prompt, contiguous (wd1's softmax runs over groups)

    def __post_init__(self):
        N, total = self.input_ids.shape
        T = total - self.prompt_length
        if self.response_mask.shape != (N, T):
            raise ValueError(f"response_mask: expected shape {(N, T)}, got {tuple(self.response_mask.shape)}")
        if self.advantages.shape != (N,):
            raise ValueError(f"advantages: expected shape {(N,)}, got {tuple(self.advantages.shape)}")
        if self.sequence_ids.shape != (N,):
            raise ValueError(f"sequence_ids: expected shape {(N,)}, got {tuple(self.sequence_ids.shape)}")
        check_int("group_size", self.group_size, low=1)  # (wd1 checks that its micro-batches hold whole groups)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, rows: slice) -> "PolicyBatch":
        return PolicyBatch(
            self.input_ids[rows], self.prompt_length, self.response_mask[rows], self.advantages[rows],
            self.sequence_ids[rows], None if self.attention_mask is None else self.attention_mask[rows],
            self.group_size,
        )

    @property
    def maskable(self) -> torch.Tensor:
        """(N, P + T) bool: response tokens only; the prompt is never masked."""
        prompt = torch.zeros_like(self.input_ids[:, : self.prompt_length], dtype=torch.bool)
        return torch.cat([prompt, self.response_mask], dim=1)


def _forward_autocast(model, autocast: torch.dtype | None):
    """Autocast for the model's forward only (never around backward, nor the fused LM head)."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(model.lm_head_weight.device.type, dtype=autocast)


def _sample_elbo(model, batch: PolicyBatch, samples: range, *, num_samples, seed, scheme, backend, autocast=None,
                 pack_sequences=False):
    """The inputs of ``fused_elbo(_loss)`` for the k MC samples ``samples`` in one forward: the batch's B
    rows repeated k times (sample-major: row s*B + b is sample ``samples[s]`` of response b), padded or
    packed (then ``hidden`` is (T, H) and ``cu_seqlens`` delimits the k·B sequences)."""
    k = len(samples)
    sample = random_mask(batch.input_ids, batch.maskable, mask_id=model.mask_token_id, seed=seed,
                         sample_index=samples, num_samples=num_samples, sequence_ids=batch.sequence_ids,
                         scheme=scheme)
    if pack_sequences:  # the same masks, gathered at the kept tokens
        packing = pack(keep_mask(batch.input_ids, batch.attention_mask).repeat(k, 1))
        with _forward_autocast(model, autocast):
            hidden = model.hidden_states(packing.gather(sample.noisy_ids.flatten(0, 1)).unsqueeze(0),
                                         **packing.model_inputs())[0]
        return dict(hidden=hidden.to(model.lm_head_weight.dtype), weight=model.lm_head_weight,
                    targets=packing.gather(batch.input_ids.repeat(k, 1)),
                    masked=packing.gather(sample.masked.flatten(0, 1)), elbo_weight=sample.elbo_weight.flatten(),
                    bias=model.lm_head_bias, backend=backend, cu_seqlens=packing.cu_seqlens)
    P = batch.prompt_length
    attention = None if batch.attention_mask is None else batch.attention_mask.repeat(k, 1)
    with _forward_autocast(model, autocast):
        hidden = model.hidden_states(sample.noisy_ids.flatten(0, 1), attention)[:, P:]
    hidden = hidden.to(model.lm_head_weight.dtype)
    return dict(hidden=hidden, weight=model.lm_head_weight, targets=batch.input_ids[:, P:].repeat(k, 1),
                masked=sample.masked[:, :, P:].flatten(0, 1), elbo_weight=sample.elbo_weight.flatten(),
                bias=model.lm_head_bias, backend=backend)


def _sample_groups(num_samples: int, samples_per_forward: int) -> list[range]:
    """0..n_t-1 in consecutive groups of k (the last one shorter when k does not divide n_t)."""
    return [range(j, min(j + samples_per_forward, num_samples)) for j in range(0, num_samples, samples_per_forward)]


def _check_packing(model, batch: PolicyBatch, pack_sequences: bool, objective: str = "bgpo") -> None:
    check_bool("pack_sequences", pack_sequences)
    if not pack_sequences or objective == "diffu_grpo":  # diffu-GRPO's per-token path always runs padded
        return
    if not supports_packing(model):
        raise ValueError(f"pack_sequences: {type(model).__name__}.hidden_states does not take cu_seqlens "
                         "(bgpo's LLaDAModelLM does); use pack_sequences=False")
    # A scored token hidden from attention would be dropped by packing but scored by the padded path.
    check_values("attention_mask", keep_mask(batch.input_ids, batch.attention_mask) | ~batch.maskable,
                 "nonzero at every response token that response_mask scores (packing keeps only those)")


def _check_samples_per_forward(samples_per_forward: int, objective: str = "bgpo") -> None:
    check_int("samples_per_forward", samples_per_forward, low=1)
    if samples_per_forward > 1 and objective not in LINEAR_OBJECTIVES:
        raise ValueError(f"samples_per_forward: objective {objective!r} is not linear in the MC samples, so its "
                         f"samples cannot share a backward; use 1, or one of {LINEAR_OBJECTIVES}")


@torch.no_grad()
def old_policy_elbos(model, batch: PolicyBatch, *, num_samples: int, seed: int, scheme: str = "stratified",
                     micro_batch_size: int | None = None, backend: str = "auto",
                     autocast: torch.dtype | None = None, samples_per_forward: int = 1,
                     pack_sequences: bool = False) -> torch.Tensor:
    """(n_t, N) ELBO terms ℓ_j^old of the current parameters, to keep as scalars for μ > 1 updates
    (``samples_per_forward`` samples per forward and ``pack_sequences`` as in ``accumulate_policy_gradient``)."""
    _check_samples_per_forward(samples_per_forward)
    _check_packing(model, batch, pack_sequences)
    step = micro_batch_size or len(batch)
    columns = []
    for start in range(0, len(batch), step):
        micro = batch.slice(slice(start, start + step))
        columns.append(torch.cat([
            fused_elbo(**_sample_elbo(model, micro, samples, num_samples=num_samples, seed=seed, scheme=scheme,
                                      backend=backend, autocast=autocast, pack_sequences=pack_sequences))
            .view(len(samples), len(micro))
            for samples in _sample_groups(num_samples, samples_per_forward)
        ]))
    return torch.cat(columns, dim=1)


def accumulate_policy_gradient(
    model,
    batch: PolicyBatch,
    *,
    objective: str = "bgpo",
    num_samples: int,
    seed: int,
    old_elbos: torch.Tensor | None = None,
    micro_batch_size: int | None = None,
    denom: float | None = None,
    scheme: str = "stratified",
    backend: str = "auto",
    clip: tuple[float, float] | None = None,
    max_log_ratio: float | None = objectives.MAX_LOG_RATIO,
    diffu_grpo_options: dict | None = None,
    spg_options: dict | None = None,
    gradient_sync: Callable[[bool], None] | None = None,
    autocast: torch.dtype | None = None,
    ref_elbos: torch.Tensor | None = None,
    beta: float = 0.0,
    backward: Callable[[torch.Tensor], None] | None = None,
    samples_per_forward: int = 1,
    pack_sequences: bool = False,
) -> dict:
    """Back-propagate the batch's loss for ``objective``; return ``{"loss": float, "elbo": (n_t, N) or None}``.

    ``old_elbos`` (n_t, N) from ``old_policy_elbos`` for off-policy updates (None: on-policy).
    ``denom`` defaults to N, so the losses of the micro-batches sum to the batch's mean loss.
    ``diffu_grpo_options`` may hold per-response tensors ``old_logp``/``ref_logp`` (N, T) for the whole
    batch; each micro-batch gets its rows.
    ``gradient_sync(flag)`` is called with False before the first backward and True before the last
    (e.g. FSDP2's ``model.set_requires_gradient_sync``): gradients are reduced across ranks once per call.
    ``autocast`` (e.g. ``torch.bfloat16``) runs the model's forwards under autocast; the LM head and
    backward run outside it, in the weights' dtype.
    ``ref_elbos`` (n_t, N) from ``old_policy_elbos`` on the reference model and ``beta`` > 0 add the KL
    penalty ``beta * objectives.elbo_kl`` per sample (bgpo, wd1, vrpo; diffu-GRPO takes ``ref_logp`` and
    ``beta`` in ``diffu_grpo_options``).
    ``backward(loss)`` replaces ``loss.backward()`` (e.g. ``accelerator.backward`` under accelerate).
    ``samples_per_forward`` k (bgpo, wd1): k MC samples share one forward and backward (k need not divide
    n_t); the gradient is k = 1's, the activations are those of k·B rows.
    ``pack_sequences`` (bgpo, wd1, vrpo, spg; diffu-GRPO runs padded): forward the rows' real tokens packed
    in one row (``bgpo.packing``), the same gradient without compute on padding; needs a model whose
    ``hidden_states`` takes ``cu_seqlens`` (``supports_packing``).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    if not isinstance(batch, PolicyBatch) or len(batch) == 0:
        raise ValueError(f"batch: expected a PolicyBatch with at least one response, got {batch!r:.80}")
    check_int("num_samples", num_samples, low=1, high=2**15 + 1)  # random_mask's sample-index range
    check_int("seed", seed, low=-(2**63), high=2**63)
    if micro_batch_size is not None:
        check_int("micro_batch_size", micro_batch_size, low=1)
    if denom is not None:
        check_real("denom", denom, positive=True)
    check_real("beta", beta, nonnegative=True)
    for name, value in (("old_elbos", old_elbos), ("ref_elbos", ref_elbos)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: expected None or a (num_samples, N) tensor, got {type(value).__name__}")
        if value is not None and value.shape != (num_samples, len(batch)):
            raise ValueError(f"{name}: expected shape {(num_samples, len(batch))}, got {tuple(value.shape)}")
    for name, value in (("old_elbos", old_elbos), ("clip", clip), ("spg_options", spg_options),
                        ("diffu_grpo_options", diffu_grpo_options)):
        if value is not None and objective not in _READ_BY[name]:  # never silently ignored
            raise ValueError(f"{name}: objective {objective!r} does not use it (only {' and '.join(_READ_BY[name])} "
                             "do); pass None")
    if beta and objective in ("spg", "diffu_grpo"):
        raise ValueError(f"beta: objective {objective!r} takes no ELBO KL term (diffu_grpo: diffu_grpo_options"
                         " 'beta' and 'ref_logp')")
    _check_samples_per_forward(samples_per_forward, objective)
    _check_packing(model, batch, pack_sequences, objective)
    if objective == "wd1" and micro_batch_size and micro_batch_size % batch.group_size:
        raise ValueError("micro_batch_size: wd1 needs whole groups in a micro-batch (a multiple of group_size)")
    denom = float(len(batch) if denom is None else denom)
    step = micro_batch_size or len(batch)
    micro_batches = -(-len(batch) // step)
    groups = _sample_groups(num_samples, samples_per_forward)
    run_backward = _Backward(micro_batches * (len(groups) if objective in LINEAR_OBJECTIVES else 1), gradient_sync,
                             backward)
    total, elbos = 0.0, []
    for start in range(0, len(batch), step):
        rows = slice(start, start + step)
        micro = batch.slice(rows)
        old = None if old_elbos is None else old_elbos[:, rows]
        ref = None if ref_elbos is None else ref_elbos[:, rows]
        sample = dict(num_samples=num_samples, seed=seed, scheme=scheme, backend=backend, autocast=autocast,
                      pack_sequences=pack_sequences)
        if objective == "diffu_grpo":
            options = {key: value[rows] if key in ("old_logp", "ref_logp") and value is not None else value
                       for key, value in (diffu_grpo_options or {}).items()}
            total += run_backward(_diffu_grpo_loss(model, micro, seed, denom, options, autocast))
            continue
        if objective in LINEAR_OBJECTIVES:
            advantages, kind = micro.advantages, "bgpo"
            if objective == "wd1":  # wd1_loss = elbo_pg_loss with A = G * (softmax_G(A) - softmax_G(-A)) and D = N
                advantages, kind = objectives.wd1_weights(micro.advantages, micro.group_size) * micro.group_size, "elbo"
            columns = []
            for samples in groups:  # rows sample-major, as _sample_elbo lays them out
                k, rows_j = len(samples), slice(samples.start, samples.stop)
                out = fused_elbo_loss(
                    **_sample_elbo(model, micro, samples, **sample), advantages=advantages.repeat(k),
                    old_elbo=None if old is None else old[rows_j].flatten(), num_samples=num_samples, denom=denom,
                    objective=kind, clip=clip if kind == "bgpo" else None, max_log_ratio=max_log_ratio,
                    ref_elbo=None if ref is None else ref[rows_j].flatten(), beta=beta,
                )
                total += run_backward(out.loss)  # these samples' graph is freed here
                columns.append(out.elbo.view(k, len(micro)))
            elbos.append(torch.cat(columns))
            continue
        stacked = torch.stack([fused_elbo(**_sample_elbo(model, micro, range(j, j + 1), **sample))
                               for j in range(num_samples)])
        if objective == "vrpo":
            loss = objectives.vrpo_loss(stacked, micro.advantages, old, denom=denom, clip=clip,
                                        max_log_ratio=max_log_ratio, ref_elbos=ref, beta=beta)
        else:
            loss = objectives.spg_loss(stacked, micro.advantages, denom=denom, **(spg_options or {}))
        total += run_backward(loss)  # all n_t graphs of the micro-batch were alive until here
        elbos.append(stacked.detach())
    loss = float(total) if values_readable(total) else total
    return {"loss": loss, "elbo": torch.cat(elbos, dim=1) if elbos else None}


class _Backward:
    """Runs the ``count`` backward passes of one call (with ``backward``, default ``Tensor.backward``),
    telling ``gradient_sync`` which one is the last."""

    def __init__(self, count: int, gradient_sync: Callable[[bool], None] | None,
                 backward: Callable[[torch.Tensor], None] | None = None):
        self.remaining, self.gradient_sync = count, gradient_sync
        self.backward = backward or torch.Tensor.backward
        if gradient_sync is not None:
            gradient_sync(count <= 1)

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        self.remaining -= 1
        if self.gradient_sync is not None and self.remaining == 0:
            self.gradient_sync(True)
        self.backward(loss)
        return loss.detach()  # no host sync per sample (and fake tensors, for the memory simulator, have no value)


def _one_step_logprobs(model, batch: PolicyBatch, seed: int, iteration: int, prompt_mask_prob: float,
                       autocast: torch.dtype | None = None):
    """(N, T) per-token log-probs of the response under d1's one-step noisy input of ``iteration``."""
    P = batch.prompt_length
    prompt = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    prompt[:, :P] = True if batch.attention_mask is None else batch.attention_mask[:, :P].bool()
    noisy = one_step_mask(batch.input_ids, prompt, batch.maskable, mask_id=model.mask_token_id, seed=seed,
                          iteration=iteration, sequence_ids=batch.sequence_ids, prompt_mask_prob=prompt_mask_prob)
    with _forward_autocast(model, autocast):
        logits = model.logits(noisy, batch.attention_mask)[:, P:]
    return token_logprobs(logits, batch.input_ids[:, P:])


@torch.no_grad()
def old_policy_token_logprobs(model, batch: PolicyBatch, *, seed: int, iteration: int = 0,
                              prompt_mask_prob: float = 0.15, micro_batch_size: int | None = None,
                              autocast: torch.dtype | None = None) -> torch.Tensor:
    """(N, T) diffu-GRPO's old per-token log-probs for inner iteration ``iteration`` (no grad), to pass
    as ``diffu_grpo_options["old_logp"]`` with the same ``iteration`` when μ > 1."""
    step = micro_batch_size or len(batch)
    return torch.cat([
        _one_step_logprobs(model, batch.slice(slice(start, start + step)), seed, iteration, prompt_mask_prob, autocast)
        for start in range(0, len(batch), step)
    ])


def _diffu_grpo_loss(model, batch: PolicyBatch, seed: int, denom: float, options: dict,
                     autocast: torch.dtype | None) -> torch.Tensor:
    """One-step estimator: per-token log-probs of the response under a fully masked response."""
    options = dict(options)
    iteration = options.pop("iteration", 0)
    prompt_mask_prob = options.pop("prompt_mask_prob", 0.15)
    old_logp = options.pop("old_logp", None)
    ref_logp = options.pop("ref_logp", None)
    options.setdefault("beta", 0.0 if ref_logp is None else 0.04)
    logp = _one_step_logprobs(model, batch, seed, iteration, prompt_mask_prob, autocast)
    return objectives.diffu_grpo_loss(logp, batch.advantages, batch.response_mask, old_logp, ref_logp,
                                      denom=denom, **options)
