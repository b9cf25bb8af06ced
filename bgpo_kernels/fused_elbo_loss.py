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

Workspace (``workspace_bytes``; s = element size of the compute dtype, N ≤ B·L):
    forward   N·H·s + N·(8 + 8 + 4) + 2·N·S·4           (gathered rows; row indices, targets, target logits; partials)
    backward  N·H·(s + 4 + s) + N·(8 + 8 + 4 + 4) + N·Vc·s  (rows, fp32 grad h, its cast; (N,) vectors; dz chunk)

Precision: bf16/fp16 operands go to the tensor cores as they are, with fp32 accumulation; dz is
rounded to the compute dtype for its two products.  fp32 inputs use ``input_precision="ieee"`` unless
PyTorch allows TF32 matmuls.  Softmax, logsumexp and soft-cap are computed in fp32 (``exp2``/``log2``).
Autocast: ``compute_dtype`` (what ``torch.get_autocast_dtype("cuda")`` gives under autocast, passed by
the op layer) casts the gathered rows, W and bias once, as Cut Cross-Entropy does; gradients come back
in the inputs' dtypes.  Under the interpreter every operand is converted to fp32 at load (SPEC §6).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._utils import cdiv, device_guard, is_interpreter

__all__ = [
    "_fwd_kernel", "_reduce_kernel", "_dz_kernel", "_grad_w_kernel", "_grad_h_kernel",
    "fused_elbo_loss_forward", "fused_elbo_loss_backward", "workspace_bytes", "DZ_CHUNK_ELEMENTS",
]

INTERPRET = is_interpreter()
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e)
_LN2 = tl.constexpr(0.6931471805599453)  # log(x) = log2(x) · ln 2
GROUP = 8  # row tiles per group in the grouped program order
# The backward's dz chunk holds at most this many elements (32 MiB in bf16); Vc is a multiple of 256.
DZ_CHUNK_ELEMENTS = 2**24
_CHUNK_QUANTUM = 256


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 products for fp32 inputs unless PyTorch allows TF32; bf16/fp16 keep Triton's default."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


_FLAGS = {
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] > 0.0,
    "EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0,
    "UPCAST": lambda args: INTERPRET,
}


def _tuned(table, key):
    return triton.autotune(configs=_configs.configs(table), key=key,
                           prune_configs_by={"early_config_prune": _configs.pruner(table)})


# ----------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _grouped(pid, num_a, num_b, GROUP_A: tl.constexpr):
    """Map a linear program id to (a, b) so that GROUP_A consecutive a-tiles sweep every b together."""
    per_group = GROUP_A * num_b
    first = (pid // per_group) * GROUP_A
    size = tl.minimum(num_a - first, GROUP_A)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _tanh(x):
    """tanh from exp2 (no libdevice): sign(x) · (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1]."""
    e = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load_tile(ptrs, row_mask, col_mask, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """Load a 2-D tile, masking only the dimensions that may run past the tensor; fp32 under UPCAST."""
    if MASK_ROWS and MASK_COLS:
        x = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=col_mask[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _logits(h_rows, w_cols, row_mask, cols, col_mask, bias_ptr, softcap, H,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_V) logits z of the tile (bias, soft-cap; -inf past the columns' end)."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + offs_h
        in_h = ks < H
        h = _load_tile(h_rows[:, None] + ks[None, :], row_mask, in_h, True, not EVEN_H, UPCAST)
        w = _load_tile(w_cols[:, None] + ks[None, :], col_mask, in_h, not EVEN_V, not EVEN_H, UPCAST)
        z = tl.dot(h, tl.trans(w), z, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        z = _tanh(z / softcap) * softcap
    if not EVEN_V:
        z = tl.where(col_mask[None, :], z, float("-inf"))
    return z


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@_tuned(_configs.FWD, ["H", "V", "N_BUCKET"])
@triton.heuristics({
    **_FLAGS,
    "EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0 and args["V_SPLIT"] % args["BLOCK_V"] == 0,
})
@triton.jit
def _fwd_kernel(
    h_ptr,  # (N, H) gathered masked rows, contiguous
    weight_ptr,  # (V, H), row stride stride_w
    bias_ptr,  # (V,) or None
    y_ptr,  # (N,) int64 targets of the rows
    max_ptr, sum_ptr,  # (N, S) fp32 out: running max (base 2) and rescaled sum of each split
    target_logit_ptr,  # (N,) fp32, NaN on entry; z[y] written by the split that holds y
    N, H, V, V_SPLIT, S, stride_w, softcap, N_BUCKET,
    DOT_PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n, split = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), S, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    targets = tl.load(y_ptr + offs_n, mask=row_mask, other=-1)
    h_rows = h_ptr + offs_n.to(tl.int64) * H

    v_start = split * V_SPLIT
    v_end = tl.minimum(v_start + V_SPLIT, V)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logits(h_rows, weight_ptr + cols.to(tl.int64) * stride_w, row_mask, cols, col_mask, bias_ptr,
                    softcap, H, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, EVEN_V, EVEN_H, UPCAST,
                    DOT_PRECISION)
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        z2 = z * _LOG2E
        new_max = tl.maximum(running_max, tl.max(z2, axis=1))
        running_sum = running_sum * tl.exp2(running_max - new_max) + tl.sum(tl.exp2(z2 - new_max[:, None]), axis=1)
        running_max = new_max

    part = offs_n.to(tl.int64) * S + split
    tl.store(max_ptr + part, running_max, mask=row_mask)
    tl.store(sum_ptr + part, running_sum, mask=row_mask)
    holds_target = (targets >= v_start) & (targets < v_end)
    tl.store(target_logit_ptr + offs_n, target_logit, mask=row_mask & holds_target)


@triton.jit
def _reduce_kernel(
    max_ptr, sum_ptr, target_logit_ptr,  # split partials of the forward
    rows_ptr,  # (N,) int64 flat indices of the masked rows
    segment_ptr,  # (B + 1,) int64: rows of sequence b are [segment[b], segment[b + 1])
    elbo_weight_ptr,  # (B,) fp32, contiguous
    elbo_ptr,  # (B,) fp32 out
    lse_ptr,  # (B·L,) fp32 out (zero-initialised; masked rows written here)
    S,
    BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(segment_ptr + b)
    end = tl.load(segment_ptr + b + 1)
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        in_seq = r < end
        # Online merge of the S split partials (m_s, Σ_s) of each row, splits in order: with M the running
        # max, Σ ← Σ · 2^(M - M') + Σ_s · 2^(m_s - M'), M' = max(M, m_s) (M' = -inf only before any split).
        row_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for split in range(0, S):
            split_max = tl.load(max_ptr + r * S + split, mask=in_seq, other=float("-inf"))
            split_sum = tl.load(sum_ptr + r * S + split, mask=in_seq, other=0.0)
            new_max = tl.maximum(row_max, split_max)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp2(row_max - safe) + split_sum * tl.exp2(split_max - safe)
            row_max = new_max
        row_max = tl.where(in_seq, row_max, 0.0)
        row_sum = tl.where(in_seq, row_sum, 1.0)
        lse = (row_max + tl.log2(row_sum)) * _LN2
        logp = tl.load(target_logit_ptr + r, mask=in_seq, other=0.0) - lse
        rows = tl.load(rows_ptr + r, mask=in_seq, other=0)
        tl.store(lse_ptr + rows, lse, mask=in_seq)
        total += tl.where(in_seq, logp, 0.0)
    tl.store(elbo_ptr + b, tl.sum(total, axis=0) * tl.load(elbo_weight_ptr + b))


# ----------------------------------------------------------------------------------------------
# Backward, one vocabulary chunk [v0, v0 + VC) per launch of each kernel
# ----------------------------------------------------------------------------------------------


@_tuned(_configs.DZ, ["H", "V", "N_BUCKET"])
@triton.heuristics({**_FLAGS, "EVEN_V": lambda args: args["VC"] % args["BLOCK_V"] == 0})
@triton.jit
def _dz_kernel(
    h_ptr,  # (N, H) gathered rows, contiguous
    weight_ptr,  # (V, H), row stride stride_w
    bias_ptr,  # (V,) or None
    y_ptr, lse_ptr, coef_ptr,  # (N,) int64 targets, fp32 logsumexps, fp32 coefficients of the rows
    dz_ptr,  # (N, stride_dz) out, compute dtype: columns [0, VC) of the chunk
    N, H, V, v0, VC, stride_w, stride_dz, softcap, N_BUCKET,
    DOT_PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    targets = tl.load(y_ptr + offs_n, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + offs_n, mask=row_mask, other=0.0)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = local < VC
    cols = v0 + local
    z = _logits(h_ptr + offs_n.to(tl.int64) * H, weight_ptr + cols.to(tl.int64) * stride_w, row_mask, cols,
                col_mask, bias_ptr, softcap, H, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, EVEN_V, EVEN_H,
                UPCAST, DOT_PRECISION)
    prob = tl.exp2((z - lse[:, None]) * _LOG2E)
    onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
    dz = coef[:, None] * (onehot - prob)  # ∂loss/∂z
    if HAS_SOFTCAP:  # d(cap · tanh(u / cap))/du = 1 - tanh², and tanh = z / cap
        capped = tl.where(col_mask[None, :], z / softcap, 0.0)
        dz = dz * (1.0 - capped * capped)
    # A target outside [0, V) has no one-hot: its row's gradient is NaN, never silently wrong.
    bad = (targets < 0) | (targets >= V)
    dz = tl.where(bad[:, None], float("nan"), dz)
    ptrs = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz + local[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@_tuned(_configs.GRAD_W, ["H", "V", "N_BUCKET", "NEED_WEIGHT", "NEED_BIAS"])
@triton.heuristics({"UPCAST": lambda args: INTERPRET})
@triton.jit
def _grad_w_kernel(
    h_ptr,  # (N, H) gathered rows, contiguous
    dz_ptr,  # (N, stride_dz): dz of the chunk
    grad_w_ptr,  # (V, H) out, contiguous, output dtype (or None)
    grad_b_ptr,  # (V,) out, output dtype (or None)
    N, H, V, v0, VC, stride_dz, N_BUCKET,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
):
    num_h = tl.cdiv(H, BLOCK_H) if NEED_WEIGHT else 1
    pid_v, pid_h = _grouped(tl.program_id(0), tl.cdiv(VC, BLOCK_V), num_h, GROUP_V)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = local < VC
    ks = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = ks < H
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):  # fixed order over the rows: deterministic
        r = n0 + tl.arange(0, BLOCK_N)
        in_n = r < N
        dz = _load_tile(dz_ptr + r.to(tl.int64)[:, None] * stride_dz + local[None, :], in_n, col_mask, True, True,
                        UPCAST)
        if NEED_WEIGHT:
            h = _load_tile(h_ptr + r.to(tl.int64)[:, None] * H + ks[None, :], in_n, in_h, True, True, UPCAST)
            acc = tl.dot(tl.trans(dz), h, acc, input_precision=DOT_PRECISION)
        if NEED_BIAS:
            col_sum += tl.sum(dz.to(tl.float32), axis=0)
    cols = (v0 + local).to(tl.int64)
    if NEED_WEIGHT:
        ptrs = grad_w_ptr + cols[:, None] * H + ks[None, :]
        tl.store(ptrs, acc.to(grad_w_ptr.dtype.element_ty), mask=col_mask[:, None] & in_h[None, :])
    if NEED_BIAS:
        tl.store(grad_b_ptr + cols, col_sum.to(grad_b_ptr.dtype.element_ty), mask=col_mask & (pid_h == 0))


@_tuned(_configs.GRAD_H, ["H", "V", "N_BUCKET"])
@triton.heuristics({"UPCAST": lambda args: INTERPRET})
@triton.jit
def _grad_h_kernel(
    dz_ptr,  # (N, stride_dz): dz of the chunk
    weight_ptr,  # (V, H), row stride stride_w
    grad_h_ptr,  # (N, H) fp32 accumulator, contiguous: read (unless FIRST) and written
    N, H, V, v0, VC, stride_dz, stride_w, N_BUCKET,
    FIRST: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n, pid_h = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(H, BLOCK_H), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    ks = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = ks < H
    out = grad_h_ptr + offs_n.to(tl.int64)[:, None] * H + ks[None, :]
    out_mask = row_mask[:, None] & in_h[None, :]
    if FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    else:
        acc = tl.load(out, mask=out_mask, other=0.0)
    for c0 in range(0, VC, BLOCK_V):  # fixed order over the chunk (and chunks run in order): deterministic
        local = c0 + tl.arange(0, BLOCK_V)
        in_c = local < VC
        dz = _load_tile(dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz + local[None, :], row_mask, in_c, True,
                        True, UPCAST)
        w = _load_tile(weight_ptr + (v0 + local).to(tl.int64)[:, None] * stride_w + ks[None, :], in_c, in_h, True,
                       True, UPCAST)
        acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
    tl.store(out, acc, mask=out_mask)


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


def _operands(hidden, weight, bias, rows, compute_dtype):
    """The masked rows gathered into a contiguous (N, H) buffer, W with unit stride along H and a
    contiguous bias, all in ``compute_dtype`` (autocast) when it is given."""
    L = hidden.shape[1]
    h = hidden[rows // L, rows % L]  # advanced indexing: a contiguous copy of the N rows only
    if compute_dtype is not None and compute_dtype != hidden.dtype:
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype: expected float32, bfloat16 or float16, got {compute_dtype}")
        h, weight = h.to(compute_dtype), weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        weight = weight.contiguous()
    return h, weight, None if bias is None else bias.contiguous()


def _softcap(softcap) -> float:
    return 0.0 if softcap is None else float(softcap)


def fused_elbo_loss_forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size, *,
                            v_split: int | None = None, compute_dtype: torch.dtype | None = None):
    """(ℓ (B,) fp32, lse (B, L) fp32).  ``chunk_size`` (the torch backend's rows per chunk) is ignored.
    ``v_split`` overrides the vocabulary split (tests); ``compute_dtype``: see the module docstring."""
    B, L, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    lse = torch.zeros(B * L, dtype=torch.float32, device=device)
    elbo = torch.empty(B, dtype=torch.float32, device=device)
    if B == 0:
        return elbo, lse.view(B, L)
    rows = masked.reshape(B * L).nonzero().squeeze(1)
    N = rows.numel()
    h, weight, bias = _operands(hidden, weight, bias, rows, compute_dtype)
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
                             chunk_size, need_hidden, need_weight, need_bias, *, v_chunk: int | None = None,
                             compute_dtype: torch.dtype | None = None):
    """(grad_hidden (B, L, H) | empty, grad_weight (V, H) | empty, grad_bias (V,) | empty).
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
    h, w, b = _operands(hidden, weight, bias, rows, compute_dtype)
    y = targets.reshape(B * L)[rows].to(torch.int64)
    lse_rows = lse.reshape(B * L)[rows].float()
    coef_rows = coef[rows // L]
    Vc = max(1, min(v_chunk or _dz_chunk(N, V), V))
    dz = torch.empty(N, Vc, dtype=h.dtype, device=device)
    grad_h = torch.empty(N, H, dtype=torch.float32, device=device) if need_hidden else None
    precision, bucket = _dot_precision(h.dtype), _configs.n_bucket(N)
    with device_guard(device):
        for v0 in range(0, V, Vc):
            VC = min(Vc, V - v0)
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(VC, meta["BLOCK_V"]),)  # noqa: E731
            _dz_kernel[grid](h, w, b, y, lse_rows, coef_rows, dz, N, H, V, v0, VC, w.stride(0), Vc,
                             _softcap(softcap), bucket, DOT_PRECISION=precision, GROUP_N=GROUP)
            if need_weight or need_bias:
                grid = lambda meta: (  # noqa: E731
                    triton.cdiv(VC, meta["BLOCK_V"]) * (triton.cdiv(H, meta["BLOCK_H"]) if need_weight else 1),)
                _grad_w_kernel[grid](h, dz, grad_weight if need_weight else None, grad_bias if need_bias else None,
                                     N, H, V, v0, VC, Vc, bucket, NEED_WEIGHT=bool(need_weight),
                                     NEED_BIAS=bool(need_bias), DOT_PRECISION=precision, GROUP_V=GROUP)
            if need_hidden:
                grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(H, meta["BLOCK_H"]),)  # noqa: E731
                _grad_h_kernel[grid](dz, w, grad_h, N, H, V, v0, VC, Vc, w.stride(0), bucket, FIRST=v0 == 0,
                                     DOT_PRECISION=precision, GROUP_N=GROUP)
    if need_hidden:
        grad_hidden[rows // L, rows % L] = grad_h.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


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
    return N * H * (s + 4 + s) + N * (8 + 8 + 4 + 4) + N * _dz_chunk(N, V) * s
