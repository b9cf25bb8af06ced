"""The Triton kernels of ``bgpo.fused_elbo_loss`` (device code only): what they compute, their workspace and
the gradient filtering they implement are described in ``fused_elbo_loss.py``, which launches them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._utils import is_interpreter

INTERPRET = is_interpreter()
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e)
_LN2 = tl.constexpr(0.6931471805599453)  # log(x) = log2(x) · ln 2



def _rounding(compute: str):
    """Flags of the kernels that read W against operands of another dtype (autocast: an fp32 W, bf16/fp16
    rows): ROUND_W, W's tiles are rounded to the compute dtype (the dtype of ``compute``, an argument) as they
    are loaded; BF16_BITS, that rounding is done on the bits (the interpreter's own fp32 -> bf16 conversion
    truncates, a GPU's rounds to nearest even)."""
    return {
        "ROUND_W": lambda args: args["weight_ptr"].dtype != args[compute].dtype,
        "BF16_BITS": lambda args: INTERPRET and args["weight_ptr"].dtype != args[compute].dtype
        and args[compute].dtype == torch.bfloat16,
    }


_FLAGS = {
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] > 0.0,
    "EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0,
    "UPCAST": lambda args: INTERPRET,
    **_rounding("h_ptr"),
}
# The consumers of the skip flags: a step of BLOCK_N rows x BLOCK_V columns covers this many filter cells
# (the dz kernel's tiles, FILTER_N x FILTER_V) along each dimension -- all of them, or it lies in one.
_CELLS = {
    "UPCAST": lambda args: INTERPRET,
    "FILTER": lambda args: args["skip_ptr"] is not None,
    "CELLS_N": lambda args: max(1, args["BLOCK_N"] // args["FILTER_N"]) if args["skip_ptr"] is not None else 1,
    "CELLS_V": lambda args: max(1, args["BLOCK_V"] // args["FILTER_V"]) if args["skip_ptr"] is not None else 1,
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
def _rounded(x, DTYPE: tl.constexpr, BF16_BITS: tl.constexpr, UPCAST: tl.constexpr):
    """A tile of W in the compute dtype ``DTYPE``, rounded to nearest even (so the products are those of
    autocast's bf16/fp16 copy of W, which is never made); fp32 under UPCAST."""
    if BF16_BITS:  # fp32 bits: add half an ulp of bf16 (ties to even), keep the top 16 bits; NaN stays NaN
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x == x, rounded, x)
    else:
        x = x.to(DTYPE, fp_downcast_rounding="rtne")
        if UPCAST:
            x = x.to(tl.float32)
    return x


@triton.jit
def _any_kept(skip_ptr, stride_skip, n0, c0, N, VC, FILTER_N, FILTER_V,
              CELLS_N: tl.constexpr, CELLS_V: tl.constexpr):
    """Whether a filter cell met by rows [n0, ...) x chunk columns [c0, ...) of a step was kept (not skipped)."""
    i = n0 // FILTER_N + tl.arange(0, CELLS_N)
    j = c0 // FILTER_V + tl.arange(0, CELLS_V)
    cells = (i < tl.cdiv(N, FILTER_N))[:, None] & (j < tl.cdiv(VC, FILTER_V))[None, :]
    skipped = tl.load(skip_ptr + i[:, None] * stride_skip + j[None, :], mask=cells, other=1)
    return tl.min(tl.min(skipped, axis=1), axis=0) == 0


@triton.jit
def _logits(h_rows, w_cols, row_mask, cols, col_mask, bias_ptr, softcap, H,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr,
            DOT_PRECISION: tl.constexpr, ROUND_W: tl.constexpr, BF16_BITS: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_V) logits z of the tile (bias, soft-cap; -inf past the columns' end)."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + offs_h
        in_h = ks < H
        h = _load_tile(h_rows[:, None] + ks[None, :], row_mask, in_h, True, not EVEN_H, UPCAST)
        w = _load_tile(w_cols[:, None] + ks[None, :], col_mask, in_h, not EVEN_V, not EVEN_H, UPCAST and not ROUND_W)
        if ROUND_W:
            w = _rounded(w, h_rows.dtype.element_ty, BF16_BITS, UPCAST)
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
    weight_ptr,  # (V, H), row stride stride_w; the compute dtype, or fp32 under autocast (ROUND_W)
    bias_ptr,  # (V,) or None
    y_ptr,  # (N,) int64 targets of the rows
    max_ptr, sum_ptr,  # (N, S) fp32 out: running max (base 2) and rescaled sum of each split
    target_logit_ptr,  # (N,) fp32, NaN on entry; z[y] written by the split that holds y
    N, H, V, V_SPLIT, S, stride_w, softcap, N_BUCKET,
    DOT_PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr, ROUND_W: tl.constexpr, BF16_BITS: tl.constexpr,
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
                    DOT_PRECISION, ROUND_W, BF16_BITS)
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
@triton.heuristics({**_FLAGS, "EVEN_V": lambda args: args["VC"] % args["BLOCK_V"] == 0,
                    "FILTER": lambda args: args["skip_ptr"] is not None})
@triton.jit
def _dz_kernel(
    h_ptr,  # (N, H) gathered rows, contiguous
    weight_ptr,  # (V, H), row stride stride_w; the compute dtype, or fp32 under autocast (ROUND_W)
    bias_ptr,  # (V,) or None
    y_ptr, lse_ptr, coef_ptr,  # (N,) int64 targets, fp32 logsumexps, fp32 coefficients of the rows
    dz_ptr,  # (N, stride_dz) out, compute dtype: columns [0, VC) of the chunk
    skip_ptr,  # (row tiles, stride_skip) int8 out: 1 where this program's tile was filtered; or None
    N, H, V, v0, VC, stride_w, stride_dz, stride_skip, softcap, filter_eps, N_BUCKET,
    DOT_PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    FILTER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr, ROUND_W: tl.constexpr, BF16_BITS: tl.constexpr,
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
                UPCAST, DOT_PRECISION, ROUND_W, BF16_BITS)
    prob = tl.exp2((z - lse[:, None]) * _LOG2E)
    onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
    dz = coef[:, None] * (onehot - prob)  # ∂loss/∂z
    if HAS_SOFTCAP:  # d(cap · tanh(u / cap))/du = 1 - tanh², and tanh = z / cap
        capped = tl.where(col_mask[None, :], z / softcap, 0.0)
        dz = dz * (1.0 - capped * capped)
    # A target outside [0, V) has no one-hot: its row's gradient is NaN, never silently wrong.
    bad = (targets < 0) | (targets >= V)
    dz = tl.where(bad[:, None], float("nan"), dz)
    if FILTER:  # skip the tile if every softmax entry is < eps and it holds no row's target
        # per-row tests (one (BLOCK_N, BLOCK_V) reduction, no 2-D temporaries: register pressure); a row with a
        # bad target or a non-finite logsumexp (NaN/inf logits) keeps the tile, so its NaN is never hidden
        col0 = v0 + pid_v * BLOCK_V
        peak = tl.max(tl.where(col_mask[None, :], prob, 0.0), axis=1)
        keep = (peak >= filter_eps) | ((targets >= col0) & (targets < col0 + BLOCK_V)) | bad
        keep = keep | (lse != lse) | (tl.abs(lse) == float("inf"))
        skip = tl.max(tl.where(row_mask & keep, 1, 0), axis=0) == 0
        dz = tl.where(skip, 0.0, dz)
        tl.store(skip_ptr + pid_n * stride_skip + pid_v, skip.to(tl.int8))
    ptrs = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz + local[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@_tuned(_configs.GRAD_W, ["H", "V", "N_BUCKET", "NEED_WEIGHT", "NEED_BIAS"])
@triton.heuristics(_CELLS)
@triton.jit
def _grad_w_kernel(
    h_ptr,  # (N, H) gathered rows, contiguous
    dz_ptr,  # (N, stride_dz): dz of the chunk
    grad_w_ptr,  # (V, H) out, contiguous, output dtype (or None)
    grad_b_ptr,  # (V,) out, output dtype (or None)
    skip_ptr,  # the dz kernel's skip flags, or None
    N, H, V, v0, VC, stride_dz, stride_skip, N_BUCKET,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_V: tl.constexpr,
    FILTER_N: tl.constexpr, FILTER_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    FILTER: tl.constexpr, CELLS_N: tl.constexpr, CELLS_V: tl.constexpr, UPCAST: tl.constexpr,
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
        kept = True
        if FILTER:
            kept = _any_kept(skip_ptr, stride_skip, n0, pid_v * BLOCK_V, N, VC, FILTER_N, FILTER_V, CELLS_N, CELLS_V)
        if kept:  # a skipped step's dz is all zeros: leaving it out changes nothing
            r = n0 + tl.arange(0, BLOCK_N)
            in_n = r < N
            dz = _load_tile(dz_ptr + r.to(tl.int64)[:, None] * stride_dz + local[None, :], in_n, col_mask, True,
                            True, UPCAST)
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
@triton.heuristics({**_CELLS, **_rounding("dz_ptr")})
@triton.jit
def _grad_h_kernel(
    dz_ptr,  # (N, stride_dz): dz of the chunk
    weight_ptr,  # (V, H), row stride stride_w; the compute dtype, or fp32 under autocast (ROUND_W)
    grad_h_ptr,  # (N, H) fp32 accumulator, contiguous: read (unless FIRST) and written
    skip_ptr,  # the dz kernel's skip flags, or None
    N, H, V, v0, VC, stride_dz, stride_w, stride_skip, N_BUCKET,
    FIRST: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
    FILTER_N: tl.constexpr, FILTER_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    FILTER: tl.constexpr, CELLS_N: tl.constexpr, CELLS_V: tl.constexpr, UPCAST: tl.constexpr,
    ROUND_W: tl.constexpr, BF16_BITS: tl.constexpr,
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
        kept = True
        if FILTER:
            kept = _any_kept(skip_ptr, stride_skip, pid_n * BLOCK_N, c0, N, VC, FILTER_N, FILTER_V, CELLS_N, CELLS_V)
        if kept:  # a skipped step's dz is all zeros: leaving it out changes nothing
            local = c0 + tl.arange(0, BLOCK_V)
            in_c = local < VC
            dz = _load_tile(dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz + local[None, :], row_mask, in_c,
                            True, True, UPCAST)
            w = _load_tile(weight_ptr + (v0 + local).to(tl.int64)[:, None] * stride_w + ks[None, :], in_c, in_h,
                           True, True, UPCAST and not ROUND_W)
            if ROUND_W:
                w = _rounded(w, dz_ptr.dtype.element_ty, BF16_BITS, UPCAST)
            acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
    tl.store(out, acc, mask=out_mask)
