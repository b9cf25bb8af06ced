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

Backends (``backend=``): ``"torch"`` (``_fused_elbo_loss_torch``: pure PyTorch, one tile of logits of
the masked rows at a time, the fallback wherever no compiled backend runs), ``"triton"``, ``"cuda"`` and
``"cpu"`` (C++) register themselves in ``bgpo.backends`` with the same ``forward``/``backward`` contract:

    forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size)
        -> (elbo (B,) fp32, lse (B, L) fp32: logsumexp of masked rows, 0 elsewhere)
    backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap, chunk_size,
             need_hidden, need_weight, need_bias)
        -> (grad_hidden (B, L, H) | empty, grad_weight (V, H) | empty, grad_bias (V,) | empty)

Gradients come back in the dtype of their input; low-precision inputs are accumulated in fp32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import objectives
from ..backends import registered_backend, resolve_backend
from ..memory import register_workspace
from ..packing import segment_ids
from . import _fused_elbo_loss_torch  # noqa: F401 - registers the "torch" backend
from ._checks import (check_all_values, check_cu_seqlens, check_device, check_int, check_real, check_shape,
                      check_tensor)

__all__ = ["fused_elbo_loss", "fused_elbo", "ElboLoss", "OBJECTIVES"]

OBJECTIVES = ("bgpo", "elbo")


class ElboLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    elbo: torch.Tensor  # (B,) fp32, detached: ℓ of this sample (keep it as old_elbo for off-policy updates)


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.library): forward, backward, fake implementations, autograd
# ----------------------------------------------------------------------------------------------


def _no_autocast(tensor: torch.Tensor):
    return torch.autocast(tensor.device.type, enabled=False)


# Host synchronisations left inside the ops: every backend learns the number of masked rows N with
# nonzero() (its outputs and grid are sized by it), and fused_elbo's value checks cost one more, outside
# the ops.  A CUDA graph cannot capture a sync: the tag makes torch.compile's CUDA graphs
# (mode="reduce-overhead") leave these ops out of the graph, and say so, rather than replay stale N.
SYNC_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("bgpo::fused_elbo_loss_fwd", mutates_args=(), tags=SYNC_TAGS)
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
    grad_filter_eps: float | None = None,  # used by the backward only: carried here for autograd
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = resolve_backend("fused_elbo_loss", backend, hidden.device).impl
    with _no_autocast(hidden):  # the op chooses its own precision (fp32 accumulation), whatever the caller's
        return impl.forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size)


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, masked, elbo_weight, softcap, backend, chunk_size, grad_filter_eps=None):
    B, L, _ = hidden.shape
    return hidden.new_empty(B, dtype=torch.float32), hidden.new_empty(B, L, dtype=torch.float32)


@torch.library.custom_op("bgpo::fused_elbo_loss_bwd", mutates_args=(), tags=SYNC_TAGS)
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
    grad_filter_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = resolve_backend("fused_elbo_loss", backend, hidden.device)
    # only the Triton backend filters: the others take no such argument (see _check_grad_filter)
    extra = {} if grad_filter_eps is None else {"grad_filter_eps": _check_grad_filter(grad_filter_eps, chosen.name)}
    with _no_autocast(hidden):
        return chosen.impl.backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap,
                                    chunk_size, need_hidden, need_weight, need_bias, **extra)


@_bwd_op.register_fake
def _(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap, backend, chunk_size,
      need_hidden, need_weight, need_bias, grad_filter_eps=None):
    return (
        hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),  # contiguous, as the backends
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_bias else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, masked, elbo_weight, softcap, backend, chunk_size, grad_filter_eps = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, masked, elbo_weight, output[1])
    ctx.softcap, ctx.backend, ctx.chunk_size, ctx.grad_filter_eps = softcap, backend, chunk_size, grad_filter_eps


def _backward(ctx, grad_elbo, _grad_lse):
    hidden, weight, bias, targets, masked, elbo_weight, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    grad_hidden, grad_weight, grad_bias = _bwd_op(
        grad_elbo.contiguous(), hidden, weight, bias, targets, masked, elbo_weight, lse,
        ctx.softcap, ctx.backend, ctx.chunk_size, need_hidden, need_weight, need_bias, ctx.grad_filter_eps,
    )
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        None, None, None, None, None, None, None,
    )


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _workspace(phase):
    """What a backend declares it allocates inside the op (0 if it declares nothing)."""
    def workspace_bytes(*args):
        hidden, weight = args[:2] if phase == "forward" else args[1:3]
        backend, chunk_size = args[7:9] if phase == "forward" else args[9:11]
        # a named backend declares its workspace whatever device the (fake) tensors claim: the simulator
        # may count a CUDA backend on fake CPU tensors
        chosen = registered_backend("fused_elbo_loss", backend) if backend != "auto" else None
        impl = (chosen or resolve_backend("fused_elbo_loss", backend, hidden.device)).impl
        declared = getattr(impl, "workspace_bytes", None)
        need_weight = phase == "backward" and args[12]
        return 0 if declared is None else declared(phase, hidden, weight, chunk_size, need_weight)
    return workspace_bytes


register_workspace("bgpo::fused_elbo_loss_fwd", _workspace("forward"))
register_workspace("bgpo::fused_elbo_loss_bwd", _workspace("backward"))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _check_elbo_inputs(hidden, weight, targets, masked, elbo_weight, bias, softcap, chunk_size, autocast=False):
    """``autocast``: the operands will be cast to one dtype, so theirs may differ (as a matmul's under autocast)."""
    check_tensor("hidden", hidden, dims=3, floating=True)
    B, L, H = hidden.shape
    check_tensor("weight", weight, dims=2, floating=True)
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected shape (V, {H}) to match hidden's last dim, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype and not autocast:
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
        check_tensor("bias", bias, floating=True, dtype=None if autocast else hidden.dtype)
        check_shape("bias", bias, (V,))
        check_device("bias", bias, hidden)
    check_real("softcap", softcap, positive=True, optional=True)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, low=1)
    check_all_values(  # one host synchronisation for both
        ("targets", ((targets >= 0) & (targets < V)) | ~masked, f"token ids in [0, {V}) at masked positions"),
        ("elbo_weight", torch.isfinite(elbo_weight) & (elbo_weight > 0), "finite values > 0"),
    )


def _check_grad_filter(grad_filter_eps, backend_name: str) -> float:
    """``grad_filter_eps`` as a float in (0, 1), for a backend that filters (only ``"triton"`` does: the
    others would silently compute the exact gradient, so they refuse a threshold instead)."""
    check_real("grad_filter_eps", grad_filter_eps, interval=(0, 1), ends="()")
    if backend_name != "triton":
        raise ValueError(f"grad_filter_eps: gradient filtering is implemented by the 'triton' backend only, "
                         f"the backend here is {backend_name!r}; pass grad_filter_eps=None for the exact gradient")
    return float(grad_filter_eps)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for tensors on ``device``, or None when autocast is off there."""
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _autocast_operands(hidden, weight, bias, impl, dtype: torch.dtype | None):
    """Under autocast for the tensors' device, the operands in the autocast dtype, as a matmul's would be (as
    Cut Cross-Entropy does; differentiable, so gradients keep the inputs' dtype).  An fp32 W goes as it is
    to a backend that rounds it to hidden's dtype piece by piece itself (``impl.weight_dtype_free``: all of
    bgpo's) -- the same products, no (V, H) copy of W, and grad W from fp32 sums; any other W, or another
    backend, gets a cast copy, held from forward to backward.  (``.to`` of a tensor already in ``dtype`` is
    the tensor itself.)"""
    if dtype is None:
        return hidden, weight, bias
    if weight.dtype != torch.float32 or not getattr(impl, "weight_dtype_free", False):
        weight = weight.to(dtype)
    return hidden.to(dtype), weight, None if bias is None else bias.to(dtype)


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
    cu_seqlens: torch.Tensor | None = None,
    grad_filter_eps: float | None = None,
) -> torch.Tensor:
    """Differentiable per-sequence ELBO term ℓ (B,) fp32 of one MC sample, from hidden states and the LM head.

    Arguments as in :func:`fused_elbo_loss`.  Use it to build objectives that are not linear in the MC
    samples (e.g. ``bgpo.objectives.vrpo_loss``) on top of the same logit-free kernels.
    """
    if cu_seqlens is not None:
        return _packed_elbo(hidden, weight, targets, masked, elbo_weight, cu_seqlens, bias=bias, softcap=softcap,
                            backend=backend, chunk_size=chunk_size, grad_filter_eps=grad_filter_eps)
    autocast = _autocast_dtype(hidden.device)
    _check_elbo_inputs(hidden, weight, targets, masked, elbo_weight, bias, softcap, chunk_size, autocast is not None)
    chosen = resolve_backend("fused_elbo_loss", backend, hidden.device)
    if grad_filter_eps is not None:
        grad_filter_eps = _check_grad_filter(grad_filter_eps, chosen.name)
    hidden, weight, bias = _autocast_operands(hidden, weight, bias, chosen.impl, autocast)
    elbo, _ = _fwd_op(
        hidden, weight, bias, targets, masked, elbo_weight,
        None if softcap is None else float(softcap), backend, chunk_size or 0, grad_filter_eps,
    )
    return elbo


def _packed_elbo(hidden, weight, targets, masked, elbo_weight, cu_seqlens, **options) -> torch.Tensor:
    """ℓ (S,) of S packed sequences with no backend of its own: the T packed rows are run as T "sequences"
    of one row each, row r weighted by its sequence's w, and the (T,) per-row terms w_s · logp_r are
    summed per sequence (deterministically, differentiable).  ℓ_s = Σ_{r in s} w_s logp_r is the padded op's
    w_s Σ_{r in s} logp_r, and the backward hands each row the coefficient gℓ_s · w_s as before, so every
    backend and the memory simulator work unchanged."""
    check_tensor("hidden", hidden, dims=2, floating=True)
    T = hidden.shape[0]
    check_cu_seqlens("cu_seqlens", cu_seqlens, T, hidden.device)
    S = cu_seqlens.shape[0] - 1
    for name, value in (("targets", targets), ("masked", masked)):
        check_tensor(name, value, dims=1)
        check_shape(name, value, (T,))  # one entry per packed row
    check_tensor("elbo_weight", elbo_weight, dims=1)
    check_shape("elbo_weight", elbo_weight, (S,))  # one per sequence: len(cu_seqlens) - 1
    check_device("elbo_weight", elbo_weight, hidden)
    sequence = segment_ids(cu_seqlens, T)
    rows = fused_elbo(hidden.unsqueeze(1), weight, targets.unsqueeze(1), masked.unsqueeze(1), elbo_weight[sequence],
                      **options)
    # Per-sequence sums as differences of one running sum, not index_add (atomics on CUDA: not
    # deterministic).  In float64, so the difference of two large partial sums loses nothing of fp32.
    running = F.pad(rows.double().cumsum(0), (1, 0))
    return (running[cu_seqlens[1:]] - running[cu_seqlens[:-1]]).float()


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
    ref_elbo: torch.Tensor | None = None,
    beta: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    grad_filter_eps: float | None = None,
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
        ref_elbo, beta: the reference policy's ℓ on the same sample (B,) and the KL coefficient: adds
            ``beta * bgpo.objectives.elbo_kl(ℓ, ref_elbo)`` (default beta = 0: no KL).
        softcap: optional logit soft-cap ``cap * tanh(z / cap)``.
            Under autocast (for the tensors' device) hidden, weight and bias are cast to the autocast dtype
            first, as a matmul would be; gradients come back in their own dtype.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.
        chunk_size: rows per block of the torch and C++ backends (default: as many as fit in 2**18 logits
            per tile); it bounds their extra memory.
        cu_seqlens: packed input (``bgpo.packing``): B sequences back to back in T rows, sequence b being
            rows ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1`` (a 1-D integer tensor from 0 to T,
            non-decreasing).  ``hidden`` is then (T, H), ``targets`` and ``masked`` (T,); ``elbo_weight``,
            ``advantages`` and the returned ℓ stay per sequence, (B,).
        grad_filter_eps: Cut Cross-Entropy's gradient filtering, ``"triton"`` backend only (another backend
            raises ValueError): the backward drops the vocabulary blocks whose softmax is below this
            threshold for every row of the row tile (never a block holding a row's target).  None (default):
            exact; 2**-12 is CCE's choice for bf16 (README, "Triton kernels", for the measured error).

    Returns:
        ``ElboLoss(loss, elbo)``: the scalar loss and the detached (B,) ℓ.
    """
    elbo = fused_elbo(hidden, weight, targets, masked, elbo_weight, bias=bias, softcap=softcap,
                      backend=backend, chunk_size=chunk_size, cu_seqlens=cu_seqlens, grad_filter_eps=grad_filter_eps)
    loss = objectives.per_sample_loss(
        elbo, advantages, old_elbo, objective=objective, num_samples=num_samples, denom=denom,
        clip=clip, max_log_ratio=max_log_ratio, ref_elbo=ref_elbo, beta=beta,
    )
    return ElboLoss(loss, elbo.detach())
