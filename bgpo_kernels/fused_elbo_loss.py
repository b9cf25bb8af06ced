"""Triton kernels of ``bgpo.fused_elbo_loss``: a fused linear masked cross-entropy that never materialises logits.

Notation (SPEC §4): hidden ``h`` (B, L, H), LM head ``W`` (V, H), optional bias (V,), targets ``y``
(B, L), ``masked`` (B, L), MC weights ``w`` (B,).  For a masked row r of sequence b::

    z_r = W h_r + bias   (optionally cap * tanh(z_r / cap))      logp_r = z_r[y_r] - logsumexp(z_r)
    ℓ_b = w_b Σ_{masked r in b} logp_r

The launchers implement the backend contract of ``bgpo.ops.fused_elbo_loss`` (its module docstring).
Every launcher gathers what its kernels read -- the N masked rows of ``h`` into a contiguous (N, H)
buffer, their targets, logsumexps and coefficients into (N,) vectors, the MC weights into a contiguous
fp32 vector -- so no kernel depends on the strides of a user tensor except W (passed with its row
stride; a copy only if H is not its unit-stride dimension).

Forward (``_fwd_kernel`` + ``_reduce_kernel``)
    Programs own BLOCK_N gathered rows and one contiguous split of the vocabulary, in grouped order
    (GROUP row tiles sweep the splits together, so their rows stay in L2 while the W split streams
    through).  Each loops over its BLOCK_V tiles, computes the (BLOCK_N x BLOCK_V) logit tile with
    ``tl.dot`` over H (fp32 accumulation) and keeps an online base-2 logsumexp and the target logit
    (written by the split that holds y).  ``target_logit`` starts as NaN: a target outside [0, V) (host
    checks skipped, e.g. under ``torch.compile``) is seen by no split and makes ℓ NaN, never garbage.
    A second kernel (one program per sequence) merges the split partials of each row and sums logp over
    the sequence's contiguous segment in a fixed order: ℓ is deterministic.

Backward (``_dz_kernel``, ``_grad_w_kernel``, ``_grad_h_kernel``): vocabulary-outer, deterministic
    The per-row coefficient arrives through autograd: ``coef_b = grad_elbo[b] · w_b`` (for BGPO
    ``-c_b w_b / D``); rows of sequences with ``coef_b == 0`` are dropped with the compaction.  The
    vocabulary is cut into chunks of Vc columns (Vc·N ≤ ``DZ_CHUNK_ELEMENTS``); per chunk:

    1. ``_dz_kernel`` recomputes the chunk's logits of the N rows (the forward's logsumexp gives the
       softmax in one pass) and stores ``dz = coef · (onehot - softmax)`` (times ``1 - tanh²`` under a
       soft-cap) in the compute dtype into an (N, Vc) buffer -- the only O(N·V)-type workspace, bounded.
    2. ``_grad_w_kernel``: ``grad_W[chunk] = dzᵀ · h``, a matmul whose programs each own one
       (BLOCK_V x BLOCK_H) tile, reduce over all N rows in fp32 registers and write it once in the
       output dtype; the program of the first H tile also writes grad bias (column sums of dz).
    3. ``_grad_h_kernel``: ``grad_h += dz · W[chunk]`` into an fp32 (N, H) accumulator; each program
       owns one (BLOCK_N x BLOCK_H) tile of it (read, reduce over the chunk, write), chunks in order.

    No (V, H) fp32 buffer, no atomics: every sum has a fixed order, so two identical calls give
    bit-identical gradients.  Work 6·N·H·V FLOPs (2 to recompute the logits, 2 per gradient).

Gradient filtering (``grad_filter_eps``, off by default; Cut Cross-Entropy's): a program of
``_dz_kernel`` whose (BLOCK_N x BLOCK_V) tile has softmax < eps in every entry and holds no row's
target (nor a row with an out-of-range target or a non-finite logsumexp, whose NaN must show) stores
dz = 0 there and sets a skip flag for its tile, the "cell".  Dropped entries are bounded by |dz| = |coef| · p · (1 - tanh²) < |coef| · eps, against the target
column's |coef| · (1 - p_y) that is never dropped.  ``_grad_w_kernel`` and ``_grad_h_kernel`` skip
their ``tl.dot`` for a (rows x columns) step all of whose cells are flagged: every block size is a
power of two and steps start at multiples of their size, so a step covers whole cells (CELLS_N x
CELLS_V of them) or lies inside one.  Skipped or not, their dz reads are zero there: the result is
exactly the gradient of the zeroed dz, whatever the tiles, and still deterministic.  The flags are
(⌈N / BN⌉, ⌈Vc / BV⌉) bytes at the dz kernel's smallest tile, reused by every chunk.

Workspace (``workspace_bytes``; s = element size of the compute dtype, N ≤ B·L):
    forward   N·H·s + N·(8 + 8 + 4) + 2·N·S·4           (gathered rows; row indices, targets, target logits; partials)
    backward  N·H·(s + 4 + s) + N·(8 + 8 + 4 + 4) + N·Vc·s + ⌈N/bn⌉·⌈Vc/bv⌉
              (rows, fp32 grad h, its cast; (N,) vectors; dz chunk; skip flags when filtering, bn x bv the
              dz kernel's smallest tile: counted always, an upper bound)

Precision: bf16/fp16 operands go to the tensor cores as they are, with fp32 accumulation; dz is
rounded to the compute dtype for its two products.  fp32 inputs use ``input_precision="ieee"`` unless
PyTorch allows TF32 matmuls.  Softmax, logsumexp and soft-cap are computed in fp32 (``exp2``/``log2``).
The compute dtype is hidden's.  Autocast is the op layer's (``bgpo.ops.fused_elbo_loss``): it casts hidden
and bias to the autocast dtype and hands W over as it is (``weight_dtype_free``): a W of another dtype
(the fp32 master weight) is rounded to the compute dtype tile by tile as the kernels load it (``ROUND_W``),
so the products are those of autocast's bf16 copy of W, which is never made, and grad W is written in
W's dtype straight from the fp32 accumulators.  Under the interpreter every operand is converted to fp32
at load (SPEC §6), after that rounding.
"""
from __future__ import annotations

import torch
import triton

from . import _configs
from ._fused_elbo_kernels import (  # noqa: F401 - the kernels are part of this module's interface
    INTERPRET, _dz_kernel, _fwd_kernel, _grad_h_kernel, _grad_w_kernel, _reduce_kernel,
)
from ._utils import cdiv, device_guard

__all__ = [
    "_fwd_kernel", "_reduce_kernel", "_dz_kernel", "_grad_w_kernel", "_grad_h_kernel",
    "fused_elbo_loss_forward", "fused_elbo_loss_backward", "workspace_bytes", "DZ_CHUNK_ELEMENTS",
]

GROUP = 8  # row tiles per group in the grouped program order
# The backward's dz chunk holds at most this many elements (32 MiB in bf16); Vc is a multiple of 256.
DZ_CHUNK_ELEMENTS = 2**24
_CHUNK_QUANTUM = 256


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 products for fp32 inputs unless PyTorch allows TF32; bf16/fp16 keep Triton's default."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------------------------
# Launchers (the backend contract of bgpo.ops.fused_elbo_loss)
# ----------------------------------------------------------------------------------------------

# Vocabulary split of the forward: a multiple of every BLOCK_V, and enough splits for ~4 programs
# per SM when the row tiles alone are too few.
_SPLIT_QUANTUM = 256
_MIN_SPLIT = 2048


def _pick_split(N: int, V: int, device: torch.device) -> int:
    if device.type != "cuda":
        return V
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, cdiv(4 * sms, max(1, cdiv(N, 128))))  # N = 0 launches nothing but must not divide by 0
    split = cdiv(cdiv(V, splits), _SPLIT_QUANTUM) * _SPLIT_QUANTUM
    return min(V, max(split, _MIN_SPLIT))


def _dz_chunk(N: int, V: int) -> int:
    """Vocabulary columns per backward chunk: N·Vc ≤ DZ_CHUNK_ELEMENTS, a multiple of 256, at most V."""
    quanta = max(1, DZ_CHUNK_ELEMENTS // (max(N, 1) * _CHUNK_QUANTUM))
    return min(V, quanta * _CHUNK_QUANTUM)


def _operands(hidden, weight, bias, rows):
    """The masked rows gathered into a contiguous (N, H) buffer, W with unit stride along H and a
    contiguous bias."""
    L = hidden.shape[1]
    h = hidden[rows // L, rows % L]  # advanced indexing: a contiguous copy of the N rows only
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        weight = weight.contiguous()
    return h, weight, None if bias is None else bias.contiguous()


def _softcap(softcap) -> float:
    return 0.0 if softcap is None else float(softcap)


def fused_elbo_loss_forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size, *,
                            v_split: int | None = None):
    """(ℓ (B,) fp32, lse (B, L) fp32).  ``chunk_size`` (the torch backend's rows per chunk) is ignored.
    ``v_split`` overrides the vocabulary split (tests)."""
    B, L, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    lse = torch.zeros(B * L, dtype=torch.float32, device=device)
    elbo = torch.empty(B, dtype=torch.float32, device=device)
    if B == 0:
        return elbo, lse.view(B, L)
    rows = masked.reshape(B * L).nonzero().squeeze(1)
    N = rows.numel()
    h, weight, bias = _operands(hidden, weight, bias, rows)
    y = targets.reshape(B * L)[rows].to(torch.int64)
    segment = torch.zeros(B + 1, dtype=torch.int64, device=device)
    torch.cumsum(masked.sum(dim=1), dim=0, out=segment[1:])
    split = max(1, min(v_split or _pick_split(N, V, device), V))
    S = cdiv(V, split)
    split_max = torch.empty(N, S, dtype=torch.float32, device=device)
    split_sum = torch.empty(N, S, dtype=torch.float32, device=device)
    target_logit = torch.full((N,), float("nan"), dtype=torch.float32, device=device)
    with device_guard(device):
        if N > 0:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * S,)  # noqa: E731
            _fwd_kernel[grid](
                h, weight, bias, y, split_max, split_sum, target_logit,
                N, H, V, split, S, weight.stride(0), _softcap(softcap), _configs.n_bucket(N),
                DOT_PRECISION=_dot_precision(h.dtype), GROUP_N=GROUP,
            )
        _reduce_kernel[(B,)](
            split_max, split_sum, target_logit, rows, segment, elbo_weight.float().contiguous(), elbo, lse, S,
            BLOCK_R=128,
        )
    return elbo, lse.view(B, L)


def fused_elbo_loss_backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap,
                             chunk_size, need_hidden, need_weight, need_bias, *, grad_filter_eps: float | None = None,
                             v_chunk: int | None = None):
    """(grad_hidden (B, L, H) | empty, grad_weight (V, H) | empty, grad_bias (V,) | empty).
    ``grad_filter_eps``: the softmax threshold of gradient filtering (module docstring), None = exact.
    ``v_chunk`` overrides the vocabulary chunk width Vc (tests)."""
    B, L, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    need_bias = need_bias and bias is not None
    coef = grad_elbo.float() * elbo_weight.float()  # c_b · w_b / D of SPEC §4 (grad_elbo = -c_b / D)
    rows = (masked & (coef != 0).unsqueeze(1)).reshape(B * L).nonzero().squeeze(1)
    N = rows.numel()
    grad_hidden = torch.zeros(B, L, H, dtype=hidden.dtype, device=device) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.empty(V, H, dtype=weight.dtype, device=device) if need_weight else weight.new_empty(0)
    grad_bias = torch.empty(V, dtype=bias.dtype, device=device) if need_bias else weight.new_empty(0)
    if N == 0 or not (need_hidden or need_weight or need_bias):
        grad_weight.zero_()
        grad_bias.zero_()
        return grad_hidden, grad_weight, grad_bias
    h, w, b = _operands(hidden, weight, bias, rows)
    y = targets.reshape(B * L)[rows].to(torch.int64)
    lse_rows = lse.reshape(B * L)[rows].float()
    coef_rows = coef[rows // L]
    Vc = max(1, min(v_chunk or _dz_chunk(N, V), V))
    dz = torch.empty(N, Vc, dtype=h.dtype, device=device)
    grad_h = torch.empty(N, H, dtype=torch.float32, device=device) if need_hidden else None
    precision, bucket = _dot_precision(h.dtype), _configs.n_bucket(N)
    skip, stride_skip = None, 0
    if grad_filter_eps is not None:
        min_n, min_v = _smallest_dz_tile()
        stride_skip = cdiv(Vc, min_v)
        skip = torch.empty(cdiv(N, min_n), stride_skip, dtype=torch.int8, device=device)

    def dz_grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(VC, meta["BLOCK_V"]),)

    with device_guard(device):
        for v0 in range(0, V, Vc):
            VC = min(Vc, V - v0)
            _dz_kernel[dz_grid](h, w, b, y, lse_rows, coef_rows, dz, skip, N, H, V, v0, VC, w.stride(0), Vc,
                                stride_skip, _softcap(softcap), float(grad_filter_eps or 0.0), bucket,
                                DOT_PRECISION=precision, GROUP_N=GROUP)
            # the filter cell: the tile of the config the autotuner ran (set before it launches)
            chosen = _dz_kernel.best_config.kwargs
            cell = dict(FILTER_N=chosen["BLOCK_N"], FILTER_V=chosen["BLOCK_V"])
            if need_weight or need_bias:
                grid = lambda meta: (  # noqa: E731
                    triton.cdiv(VC, meta["BLOCK_V"]) * (triton.cdiv(H, meta["BLOCK_H"]) if need_weight else 1),)
                _grad_w_kernel[grid](h, dz, grad_weight if need_weight else None, grad_bias if need_bias else None,
                                     skip, N, H, V, v0, VC, Vc, stride_skip, bucket, NEED_WEIGHT=bool(need_weight),
                                     NEED_BIAS=bool(need_bias), DOT_PRECISION=precision, GROUP_V=GROUP, **cell)
            if need_hidden:
                grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(H, meta["BLOCK_H"]),)  # noqa: E731
                _grad_h_kernel[grid](dz, w, grad_h, skip, N, H, V, v0, VC, Vc, w.stride(0), stride_skip, bucket,
                                     FIRST=v0 == 0, DOT_PRECISION=precision, GROUP_N=GROUP, **cell)
    if need_hidden:
        grad_hidden[rows // L, rows % L] = grad_h.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


def _smallest_dz_tile() -> tuple[int, int]:
    """(BLOCK_N, BLOCK_V) lower bounds over the dz kernel's configs: the skip flags fit any of them."""
    configs = _dz_kernel.configs
    return min(c.kwargs["BLOCK_N"] for c in configs), min(c.kwargs["BLOCK_V"] for c in configs)


def workspace_bytes(phase, hidden, weight, chunk_size, need_weight=False) -> int:
    """Bytes the Triton backend holds inside one call beyond its outputs, for ``bgpo.memory``'s simulator.

    N is data (unknown on fake tensors): taken as B·L, exact when every position is masked and an upper
    bound otherwise; the forward's split count as its bound cdiv(V, 2048) (``_MIN_SPLIT``).  Formulas in
    the module docstring; measured against the CPU allocator in tests/test_triton_kernels.py.
    """
    B, L, H = hidden.shape
    V = weight.shape[0]
    N = B * L
    s = hidden.element_size()
    if phase == "forward":
        return N * H * s + N * (8 + 8 + 4) + 2 * N * cdiv(V, min(V, _MIN_SPLIT)) * 4
    Vc = _dz_chunk(N, V)
    min_n, min_v = _smallest_dz_tile()
    return N * H * (s + 4 + s) + N * (8 + 8 + 4 + 4) + N * Vc * s + cdiv(N, min_n) * cdiv(Vc, min_v)
