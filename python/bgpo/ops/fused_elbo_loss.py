"""``bgpo.fused_elbo_loss``: the per-MC-sample ELBO term and its RL loss, without materialising logits.

For MC sample j of a batch of B responses (SPEC §4), with masked row r of sequence b, hidden state
``h_r`` (H,), LM head ``W`` (V, H) and optional bias::

    z_r    = W h_r + bias                     (optionally soft-capped: cap * tanh(z / cap))
    logp_r = z_r[y_r] - logsumexp(z_r)
    ℓ_b    = w_b * Σ_{masked r in b} logp_r   (w_b: the MC weight L/l or 1/t from random_mask)
    loss   = objective(ℓ, ℓ_old, A)           (bgpo: -(1/D) Σ_b g_b, see bgpo.objectives)

Backward, for the per-sequence gradient ``gℓ_b = ∂loss/∂ℓ_b`` (for BGPO ``-c_b/D``, with c the
per-sample bound weight)::

    ∂loss/∂z_r = gℓ_b * w_b * (onehot(y_r) - softmax(z_r))      a per-ROW coefficient gℓ_b * w_b
    grad h_r   = (∂loss/∂z_r) W          grad W += (∂loss/∂z_r)ᵀ h_r          grad bias += ∂loss/∂z_r

The op is split in two: ``fused_elbo`` is the differentiable ℓ (a ``torch.library`` custom op pair
``bgpo::fused_elbo_loss_fwd`` / ``_bwd`` with fake implementations and autograd), and the objective is
applied to the (B,) vector ℓ in plain PyTorch.  Autograd's chain rule then hands the backward kernel
exactly the per-row coefficient above, so any objective of ``bgpo.objectives`` (or a user's own) gets
the fused, logit-free backward.

Backends (``backend=``): ``"torch"`` here, chunked over masked rows only, computing the logits of one
chunk of rows at a time and recomputing them in backward: extra memory O(chunk·V + rows·H), never
O(rows·V); work proportional to the number of masked rows.  ``"triton"``, ``"cuda"`` and ``"cpu"``
(C++) register themselves in ``bgpo.backends`` with the same ``forward``/``backward`` contract:

    forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size)
        -> (elbo (B,) fp32, lse (B, L) fp32: logsumexp of masked rows, 0 elsewhere)
    backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap, chunk_size,
             need_hidden, need_weight, need_bias)
        -> (grad_hidden (B, L, H) | empty, grad_weight (V, H) | empty, grad_bias (V,) | empty)

Gradients come back in the dtype of their input; low-precision inputs are accumulated in fp32.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import objectives
from ..backends import Backend, register_backend, resolve_backend
from ..memory import register_workspace
from ._checks import check_device, check_int, check_shape, check_tensor, check_values

__all__ = ["fused_elbo_loss", "fused_elbo", "ElboLoss", "OBJECTIVES", "DEFAULT_CHUNK_ELEMENTS"]

OBJECTIVES = ("bgpo", "elbo")
# The torch backend's chunk holds at most this many logits (rows_per_chunk = this // V): 8 MB in fp32.
DEFAULT_CHUNK_ELEMENTS = 2**21


class ElboLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    elbo: torch.Tensor  # (B,) fp32, detached: ℓ of this sample (keep it as old_elbo for off-policy updates)


# ----------------------------------------------------------------------------------------------
# The torch backend
# ----------------------------------------------------------------------------------------------


def _masked_rows(masked: torch.Tensor) -> torch.Tensor:
    """Flat indices (into B*L) of the masked positions, in row-major order."""
    return masked.reshape(-1).nonzero().squeeze(1)


def _rows_per_chunk(chunk_size: int, num_rows: int, vocab: int) -> int:
    rows = chunk_size if chunk_size > 0 else DEFAULT_CHUNK_ELEMENTS // vocab
    return max(1, min(rows, max(num_rows, 1)))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    """fp32 logits of a chunk of rows, and the tanh of the soft-cap (None without one)."""
    z = F.linear(h, weight, bias).float()
    if softcap is None:
        return z, None
    capped = torch.tanh(z.div_(softcap))
    return capped * softcap, capped


def _forward_chunk(h, weight, bias, targets, softcap):
    """(logsumexp, target log-prob) of a chunk of rows; the chunk's logits die on return."""
    z, _ = _chunk_logits(h, weight, bias, softcap)
    lse = torch.logsumexp(z, dim=1)
    return lse, z.gather(1, targets.unsqueeze(1)).squeeze(1) - lse


def _torch_forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size):
    B, L, H = hidden.shape
    rows = _masked_rows(masked)
    flat_hidden = hidden.reshape(B * L, H)
    flat_targets = targets.reshape(B * L)
    lse = torch.zeros(B * L, dtype=torch.float32, device=hidden.device)
    logp = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
    step = _rows_per_chunk(chunk_size, rows.numel(), weight.shape[0])
    for start in range(0, rows.numel(), step):
        r = rows[start : start + step]
        lse[r], logp[start : start + step] = _forward_chunk(flat_hidden[r], weight, bias, flat_targets[r], softcap)
    per_sequence = torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add_(0, rows // L, logp)
    return per_sequence * elbo_weight.float(), lse.view(B, L)


def _backward_chunk(h, weight, bias, targets, lse, coef, softcap, grad_weight, grad_bias, need_hidden):
    """grad of a chunk's hidden rows (None unless need_hidden); accumulates into grad_weight / grad_bias.

    ``dz = coef * (onehot - softmax)`` is built in place in the chunk's logits buffer, which dies on return.
    """
    z, capped = _chunk_logits(h, weight, bias, softcap)
    dz = z.sub_(lse.unsqueeze(1)).exp_()
    dz[torch.arange(h.shape[0], device=dz.device), targets] -= 1.0
    dz.mul_(-coef.unsqueeze(1))
    if capped is not None:  # d(cap * tanh(z / cap))/dz = 1 - tanh²
        dz.mul_(1.0 - capped.square_())
    if grad_bias is not None:
        grad_bias += dz.sum(dim=0)
    if grad_weight is not None:  # in fp32, in place: no (V, H) temporary whatever the input dtype
        grad_weight.addmm_(dz.t(), h.float())
    return dz.to(weight.dtype) @ weight if need_hidden else None


def _torch_backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap, chunk_size,
                    need_hidden, need_weight, need_bias):
    B, L, H = hidden.shape
    V = weight.shape[0]
    rows = _masked_rows(masked)
    flat_hidden = hidden.reshape(B * L, H)
    flat_targets = targets.reshape(B * L)
    flat_lse = lse.reshape(B * L)
    # ∂loss/∂logp_r = gℓ_b * w_b for the sequence b of row r.
    row_coef = (grad_elbo.float() * elbo_weight.float())[rows // L]

    grad_hidden = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(V, H, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_bias else None

    step = _rows_per_chunk(chunk_size, rows.numel(), V)
    for start in range(0, rows.numel(), step):
        r = rows[start : start + step]
        grad_rows = _backward_chunk(flat_hidden[r], weight, bias, flat_targets[r], flat_lse[r],
                                    row_coef[start : start + step], softcap, grad_weight, grad_bias, need_hidden)
        if need_hidden:
            grad_hidden.view(B * L, H)[r] = grad_rows
    return (
        grad_hidden,
        grad_weight.to(weight.dtype) if need_weight else weight.new_empty(0),
        grad_bias.to(bias.dtype) if need_bias else weight.new_empty(0),
    )


def _torch_workspace_bytes(phase, hidden, weight, chunk_size, need_weight=False):
    """Peak bytes the torch backend holds inside one call beyond its outputs (``bgpo.memory.track_fake_memory``).

    Per chunk of c rows: the fp32 logits plus the matmul's low-precision output they are cast from; in
    the forward, ``logsumexp``'s fp32 temporary outlives that output instead; in the backward the
    low-precision copy of dz.  A low-precision LM head adds the backward's fp32 grad-W accumulator,
    which outlives the chunks and coexists with the cast output at the end.  The number of masked rows
    is data, unknown on fake tensors, so a chunk is taken to be full: exact when at least one chunk of
    rows is masked, an upper bound otherwise.  (Checked against the CPU allocator in tests/test_memory.py.)
    """
    B, L, _ = hidden.shape
    V, H = weight.shape
    logits = _rows_per_chunk(chunk_size, B * L, V) * V
    low = weight.element_size() if weight.dtype != torch.float32 else 0
    if phase == "forward":
        return logits * (4 + max(4, low))
    chunk = logits * (4 + low)
    if not (need_weight and low):
        return chunk
    accumulator, cast_output = V * H * 4, V * H * low
    return accumulator + max(chunk - cast_output, 0)


register_backend(
    "fused_elbo_loss",
    Backend("torch", SimpleNamespace(forward=_torch_forward, backward=_torch_backward,
                                     workspace_bytes=_torch_workspace_bytes), available=lambda d: None),
)


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.library): forward, backward, fake implementations, autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("bgpo::fused_elbo_loss_fwd", mutates_args=())
def _fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    masked: torch.Tensor,
    elbo_weight: torch.Tensor,
    softcap: float | None,
    backend: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = resolve_backend("fused_elbo_loss", backend, hidden.device).impl
    return impl.forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size)


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, masked, elbo_weight, softcap, backend, chunk_size):
    B, L, _ = hidden.shape
    return hidden.new_empty(B, dtype=torch.float32), hidden.new_empty(B, L, dtype=torch.float32)


@torch.library.custom_op("bgpo::fused_elbo_loss_bwd", mutates_args=())
def _bwd_op(
    grad_elbo: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    masked: torch.Tensor,
    elbo_weight: torch.Tensor,
    lse: torch.Tensor,
    softcap: float | None,
    backend: str,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = resolve_backend("fused_elbo_loss", backend, hidden.device).impl
    return impl.backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap,
                         chunk_size, need_hidden, need_weight, need_bias)


@_bwd_op.register_fake
def _(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap, backend, chunk_size,
      need_hidden, need_weight, need_bias):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_bias else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, masked, elbo_weight, softcap, backend, chunk_size = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, masked, elbo_weight, output[1])
    ctx.softcap, ctx.backend, ctx.chunk_size = softcap, backend, chunk_size


def _backward(ctx, grad_elbo, _grad_lse):
    hidden, weight, bias, targets, masked, elbo_weight, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    grad_hidden, grad_weight, grad_bias = _bwd_op(
        grad_elbo.contiguous(), hidden, weight, bias, targets, masked, elbo_weight, lse,
        ctx.softcap, ctx.backend, ctx.chunk_size, need_hidden, need_weight, need_bias,
    )
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        None, None, None, None, None, None,
    )


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _workspace(phase):
    """What a backend declares it allocates inside the op (0 if it declares nothing)."""
    def workspace_bytes(*args):
        hidden, weight = args[:2] if phase == "forward" else args[1:3]
        backend, chunk_size = args[7:9] if phase == "forward" else args[9:11]
        impl = resolve_backend("fused_elbo_loss", backend, hidden.device).impl
        declared = getattr(impl, "workspace_bytes", None)
        need_weight = phase == "backward" and args[12]
        return 0 if declared is None else declared(phase, hidden, weight, chunk_size, need_weight)
    return workspace_bytes


register_workspace("bgpo::fused_elbo_loss_fwd", _workspace("forward"))
register_workspace("bgpo::fused_elbo_loss_bwd", _workspace("backward"))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _check_elbo_inputs(hidden, weight, targets, masked, elbo_weight, bias, softcap, chunk_size):
    check_tensor("hidden", hidden, dims=3, floating=True)
    B, L, H = hidden.shape
    check_tensor("weight", weight, dims=2, floating=True)
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected shape (V, {H}) to match hidden's last dim, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} (the dtype of hidden), got {weight.dtype}")
    V = weight.shape[0]
    check_device("weight", weight, hidden)
    check_tensor("targets", targets, integer=True)
    check_shape("targets", targets, (B, L))
    check_device("targets", targets, hidden)
    check_tensor("masked", masked, dtype=torch.bool)
    check_shape("masked", masked, (B, L))
    check_device("masked", masked, hidden)
    check_tensor("elbo_weight", elbo_weight, floating=True)
    check_shape("elbo_weight", elbo_weight, (B,))
    check_device("elbo_weight", elbo_weight, hidden)
    if bias is not None:
        check_tensor("bias", bias, dtype=hidden.dtype)
        check_shape("bias", bias, (V,))
        check_device("bias", bias, hidden)
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ValueError(f"softcap: expected None or a positive float, got {softcap!r}")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, low=1)
    check_values("targets", ((targets >= 0) & (targets < V)) | ~masked, f"token ids in [0, {V}) at masked positions")
    check_values("elbo_weight", torch.isfinite(elbo_weight) & (elbo_weight > 0), "finite values > 0")


def fused_elbo(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    elbo_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Differentiable per-sequence ELBO term ℓ (B,) fp32 of one MC sample, from hidden states and the LM head.

    Arguments as in :func:`fused_elbo_loss`.  Use it to build objectives that are not linear in the MC
    samples (e.g. ``bgpo.objectives.vrpo_loss``) on top of the same logit-free kernels.
    """
    _check_elbo_inputs(hidden, weight, targets, masked, elbo_weight, bias, softcap, chunk_size)
    elbo, _ = _fwd_op(
        hidden, weight, bias, targets, masked, elbo_weight,
        None if softcap is None else float(softcap), backend, chunk_size or 0,
    )
    return elbo


def fused_elbo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    elbo_weight: torch.Tensor,
    advantages: torch.Tensor,
    old_elbo: torch.Tensor | None = None,
    *,
    num_samples: int = 1,
    denom: float | None = None,
    bias: torch.Tensor | None = None,
    objective: str = "bgpo",
    clip: tuple[float, float] | None = None,
    max_log_ratio: float | None = objectives.MAX_LOG_RATIO,
    softcap: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> ElboLoss:
    """Loss of one MC sample of the BGPO bound (or the plain ELBO policy gradient), logit-free.

    Call it once per MC sample j and back-propagate each loss on its own: gradients accumulate and
    the memory of one sample's graph is freed before the next (SPEC §2).

    Args:
        hidden: (B, L, H) final hidden states at the response positions, computed on the noisy input
            of this sample; fp32, bf16 or fp16.
        weight: (V, H) LM head, same dtype and device as ``hidden``.
        targets: (B, L) integer clean token ids; values in [0, V) where ``masked``.
        masked: (B, L) bool, the positions masked in this sample (``random_mask(...).masked``).
        elbo_weight: (B,) MC weights, finite and > 0 (``random_mask(...).elbo_weight``).
        advantages: (B,) finite group advantages A (``bgpo.group_advantages``).
        old_elbo: (B,) ℓ of the old policy on the same sample (the ``elbo`` this function returned
            under θ_old), or None on-policy (then d = 0 and only the gradient flows).
        num_samples: n_t, the number of MC samples this loss is one of (the bound's 1/n_t).
        denom: D, the number of responses the loss is averaged over (default B); give the full batch
            size when the batch is split into micro-batches, so their losses sum to the batch's.
        bias: optional (V,) LM-head bias.
        objective: ``"bgpo"`` (the bound of SPEC §2, default) or ``"elbo"`` (-(1/D) Σ A ℓ / n_t, the
            linear ELBO policy gradient that SPG uses for A > 0 and wd1 with its own weights as A).
        clip: optional (ε_low, ε_high): PPO-style clipping of the ratio (1 + d or e^d); default off.
        max_log_ratio: clamp on d in the exponential branch (A < 0); None disables it.
        softcap: optional logit soft-cap ``cap * tanh(z / cap)``.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.
        chunk_size: rows of logits per chunk (default: as many as fit in 2**21 logits).

    Returns:
        ``ElboLoss(loss, elbo)``: the scalar loss and the detached (B,) ℓ.
    """
    elbo = fused_elbo(hidden, weight, targets, masked, elbo_weight, bias=bias, softcap=softcap,
                      backend=backend, chunk_size=chunk_size)
    loss = objectives.per_sample_loss(
        elbo, advantages, old_elbo, objective=objective, num_samples=num_samples, denom=denom,
        clip=clip, max_log_ratio=max_log_ratio,
    )
    return ElboLoss(loss, elbo.detach())
