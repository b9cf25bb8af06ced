"""Triton kernels of ``bgpo.fused_elbo_loss``: a fused linear masked cross-entropy that never materialises logits.

Notation (SPEC §4): hidden ``h`` (B, L, H), LM head ``W`` (V, H), optional bias (V,), targets ``y``
(B, L), ``masked`` (B, L), MC weights ``w`` (B,).  For a masked row r of sequence b::

    z_r = W h_r + bias   (optionally cap * tanh(z_r / cap))      logp_r = z_r[y_r] - logsumexp(z_r)
    ℓ_b = w_b Σ_{masked r in b} logp_r

The launchers implement the backend contract of ``bgpo.ops.fused_elbo_loss`` (its module docstring):
``fused_elbo_loss_forward`` -> (ℓ (B,) fp32, lse (B, L) fp32) and ``fused_elbo_loss_backward`` ->
(grad_hidden, grad_weight, grad_bias).

Forward (``_fused_elbo_loss_fwd_kernel`` + ``_fused_elbo_loss_reduce_kernel``)
    The masked rows are compacted first (``nonzero`` on ``masked``: N row indices, row-major, so the
    rows of a sequence are contiguous); the kernels gather hidden rows through that index, so work
    and memory scale with N, never with B·L.  The grid is (row tiles) x (vocabulary splits): a
    program owns BLOCK_N rows and one contiguous split of the vocabulary, loops over its BLOCK_V
    tiles, computes each (BLOCK_N x BLOCK_V) logit tile with ``tl.dot`` over H in BLOCK_H steps
    (fp32 accumulation), and keeps an online base-2 logsumexp (running max and rescaled sum) and the
    target logit (the split that holds y_r writes it).  Splitting V gives enough programs to fill an
    H100 when N is small; the programs of one split run side by side, so each tile of W is read from
    HBM about once and the gathered hidden rows stay in L2.  A second, tiny kernel (one program per
    sequence) merges the split partials of each row into its logsumexp, writes it to ``lse`` and sums
    logp over the sequence's contiguous segment of rows in a fixed order: ℓ is deterministic
    (no atomics in the forward).  Extra memory: O(N · splits) floats.

Backward (``_fused_elbo_loss_bwd_kernel``)
    The per-row coefficient arrives through autograd, not through a second objective path: the
    objective (BGPO's bound, or any other) is applied in PyTorch to the (B,) vector ℓ, so the
    backward receives ``grad_elbo[b] = ∂loss/∂ℓ_b`` -- for BGPO ``-c_b / D`` with ``c_b`` the
    per-sample bound weight of SPEC §2 -- and the launcher forms ``coef_b = grad_elbo[b] · w_b``:
    exactly the ``c_b · w_b / D`` of SPEC §4, one fp32 scalar per sequence, looked up per row.
    Rows of sequences with ``coef_b == 0`` (A = 0, e.g. a group whose rewards are all equal) are
    dropped with the compaction: their gradient is exactly zero.

    One fused kernel over a 1-D grid of (row tile, vocabulary tile) pairs, row tiles fastest (the
    programs that run together share their W tile, and the N x H hidden rows stay in L2).  Each
    program recomputes its logit tile (the logsumexp comes from the forward, so one pass suffices),
    forms ``dz = coef_r · (onehot(y_r) - softmax(z_r))`` (times ``1 - tanh²`` under a soft-cap), then
    streams over H in BLOCK_H chunks: ``dz @ W[tile, chunk]`` is added to the fp32 grad of its rows
    and ``dzᵀ @ h[rows, chunk]`` to the fp32 grad of its vocabulary rows, both with relaxed
    ``tl.atomic_add`` (fire-and-forget reductions in L2; the Cut Cross-Entropy scheme); the bias grad
    is the column sum of dz.  Nothing of size N x V is stored; extra memory is the fp32 accumulators
    (N x H, V x H, V).  Each program starts its H loop
    at a different chunk (rotated by its row-tile index) so programs that share a W tile do not hit
    the same grad_W addresses at the same moment.  fp32 atomics make the summation order, and so the
    last bits of the gradients, vary from run to run (as with ``index_add_`` on CUDA).

Work (N = masked rows, padding of the last tiles aside):
    forward  2·N·H·V FLOPs (the logits) plus O(N·V) exponentials;
    backward 6·N·H·V FLOPs: 2·N·H·V to recompute the logits, 2·N·H·V for grad_hidden and 2·N·H·V for
    grad_weight (4·N·H·V when only one of them is needed).

Precision: bf16/fp16 operands go to the tensor cores as they are, with fp32 accumulation; dz is
rounded to the input dtype for its two products (as the torch backend does) and accumulated in fp32.
fp32 inputs use ``tl.dot(..., input_precision="ieee")``, or TF32 when PyTorch allows TF32 matmuls
(``torch.get_float32_matmul_precision() != "highest"``).  The softmax, logsumexp and soft-cap are
computed in fp32 (``exp2``/``log2`` with the log2(e) scale folded in).  Under the interpreter
(``TRITON_INTERPRET=1``) every operand is converted to fp32 at load, as SPEC §6 requires.

Autotuning: separate config lists for sm_80 (A100: 164 KB shared memory) and sm_90 (H100: 228 KB,
larger tiles and deeper pipelines); ``early_config_prune`` picks the list of the tensor's device.  The
tuning key is (H, V, and the dtypes), never N, which changes with every batch.  The backward tunes
with ``reset_to_zero`` on its accumulators.  Under the interpreter a single small config is used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cdiv, device_guard, is_interpreter

__all__ = [
    "_fused_elbo_loss_fwd_kernel",
    "_fused_elbo_loss_reduce_kernel",
    "_fused_elbo_loss_bwd_kernel",
    "fused_elbo_loss_forward",
    "fused_elbo_loss_backward",
]

INTERPRET = is_interpreter()
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e)
_LN2 = tl.constexpr(0.6931471805599453)  # log(x) = log2(x) · ln 2


# ----------------------------------------------------------------------------------------------
# Autotune configurations
# ----------------------------------------------------------------------------------------------


def _config(n, v, h, warps, stages):
    return triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_H": h}, num_warps=warps, num_stages=stages)


_INTERPRETER_CONFIGS = [_config(16, 32, 32, 4, 1)]

# Every bf16/fp16 config below compiles for its architecture without register spills (checked with
# ptxas -v on Triton 3.8 for 16-byte-aligned operands).  The last ones are small tiles for fp32 inputs,
# whose IEEE products do not run on the tensor cores; the autotuner times them all and keeps the best.
# A100 (sm_80): 164 KB of shared memory per SM; a bf16 stage of the forward holds (BN + BV) x BH
# operands, (128 + 128) x 64 x 2 B = 32 KB.
_FWD_SM80 = [
    _config(128, 128, 64, 8, 3),
    _config(64, 256, 64, 8, 3),
    _config(64, 128, 64, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 3),
    _config(32, 128, 32, 4, 3),
]
# H100 (sm_90): 228 KB; wgmma tiles of 128 x 128 and 64 x 256 with deeper pipelines.
_FWD_SM90 = [
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 64, 8, 3),
    _config(64, 256, 64, 8, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 3),
]
# The backward holds the logit tile, dz and two (BN|BV) x BH products in registers: moderate tiles.
_BWD_SM80 = [
    _config(64, 128, 32, 4, 3),
    _config(128, 128, 32, 8, 3),
    _config(128, 64, 32, 4, 3),
    _config(64, 64, 32, 4, 4),
    _config(32, 64, 32, 4, 3),
]
_BWD_SM90 = [
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 32, 8, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 32, 4, 3),
    _config(32, 64, 32, 4, 3),
]


def _device_configs(sm80, sm90):
    def prune(configs, named_args, **kwargs):
        device = named_args["hidden_ptr"].device
        if device.type != "cuda":
            return configs[:1]
        major, _ = torch.cuda.get_device_capability(device)
        return sm90 if major >= 9 else sm80

    return prune


_FWD_CONFIGS = _INTERPRETER_CONFIGS if INTERPRET else _FWD_SM80 + _FWD_SM90
_BWD_CONFIGS = _INTERPRETER_CONFIGS if INTERPRET else _BWD_SM80 + _BWD_SM90


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


# ----------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------


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
def _logit_tile(
    h_rows, w_cols, row_mask, col_mask, H,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 (BLOCK_N, BLOCK_V) tile of h Wᵀ; ``h_rows``/``w_cols`` point at column 0 of each row."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + offs_h
        in_h = ks < H
        h = _load_tile(h_rows[:, None] + ks[None, :], row_mask, in_h, True, not EVEN_H, UPCAST)
        w = _load_tile(w_cols[:, None] + ks[None, :], col_mask, in_h, not EVEN_V, not EVEN_H, UPCAST)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _finish_logits(acc, bias_ptr, cols, col_mask, softcap,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_V: tl.constexpr):
    """Add the bias and apply the soft-cap ``cap * tanh(z / cap)``; columns past V become -inf."""
    z = acc
    if HAS_BIAS:
        if EVEN_V:
            z += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        else:
            z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        z = _tanh(z / softcap) * softcap
    if not EVEN_V:
        z = tl.where(col_mask[None, :], z, float("-inf"))
    return z


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_FWD_CONFIGS,
    key=["H", "V"],
    prune_configs_by={"early_config_prune": _device_configs(_FWD_SM80, _FWD_SM90)},
)
@triton.heuristics({
    **_FLAGS,
    "EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0 and args["V_SPLIT"] % args["BLOCK_V"] == 0,
})
@triton.jit
def _fused_elbo_loss_fwd_kernel(
    hidden_ptr,  # (B·L, H), row stride stride_h
    weight_ptr,  # (V, H), row stride stride_w
    bias_ptr,  # (V,) or None
    targets_ptr,  # (B·L,) integer
    rows_ptr,  # (N,) int64: flat indices of the masked rows
    max_ptr,  # (N, S) fp32 out: running max of the split, base 2
    sum_ptr,  # (N, S) fp32 out: sum of exp2(z·log2e - max) over the split
    target_logit_ptr,  # (N,) fp32 out: z[y] (written by the split that holds y)
    N, H, V,
    V_SPLIT,  # columns per split (the last split is shorter)
    S,  # number of splits
    stride_h, stride_w,
    softcap,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    rows = tl.load(rows_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    h_rows = hidden_ptr + rows * stride_h

    v_start = split * V_SPLIT
    v_end = tl.minimum(v_start + V_SPLIT, V)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        w_cols = weight_ptr + cols.to(tl.int64) * stride_w
        acc = _logit_tile(h_rows, w_cols, row_mask, col_mask, H, BLOCK_N, BLOCK_V, BLOCK_H, EVEN_V, EVEN_H,
                          UPCAST, DOT_PRECISION)
        z = _finish_logits(acc, bias_ptr, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_V)
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
def _fused_elbo_loss_reduce_kernel(
    max_ptr, sum_ptr, target_logit_ptr,  # split partials of the forward
    rows_ptr,  # (N,) int64
    segment_ptr,  # (B + 1,) int64: rows of sequence b are [segment[b], segment[b + 1])
    elbo_weight_ptr,  # (B,) any float dtype
    elbo_ptr,  # (B,) fp32 out
    lse_ptr,  # (B·L,) fp32 out (zero-initialised; masked rows written here)
    S,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(segment_ptr + b)
    end = tl.load(segment_ptr + b + 1)
    offs_s = tl.arange(0, BLOCK_S)
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        in_seq = r < end
        part = r[:, None] * S + offs_s[None, :]
        part_mask = in_seq[:, None] & (offs_s[None, :] < S)
        split_max = tl.load(max_ptr + part, mask=part_mask, other=float("-inf"))
        split_sum = tl.load(sum_ptr + part, mask=part_mask, other=0.0)
        row_max = tl.max(split_max, axis=1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        row_sum = tl.sum(split_sum * tl.exp2(split_max - row_max[:, None]), axis=1)
        row_sum = tl.where(in_seq, row_sum, 1.0)
        lse = (row_max + tl.log2(row_sum)) * _LN2
        logp = tl.load(target_logit_ptr + r, mask=in_seq, other=0.0) - lse
        rows = tl.load(rows_ptr + r, mask=in_seq, other=0)
        tl.store(lse_ptr + rows, lse, mask=in_seq)
        total += tl.where(in_seq, logp, 0.0)
    weight = tl.load(elbo_weight_ptr + b).to(tl.float32)
    tl.store(elbo_ptr + b, tl.sum(total, axis=0) * weight)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_BWD_CONFIGS,
    key=["H", "V", "NEED_HIDDEN", "NEED_WEIGHT", "NEED_BIAS"],
    prune_configs_by={"early_config_prune": _device_configs(_BWD_SM80, _BWD_SM90)},
    reset_to_zero=["grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr"],
)
@triton.heuristics({**_FLAGS, "EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0})
@triton.jit
def _fused_elbo_loss_bwd_kernel(
    hidden_ptr,  # (B·L, H), row stride stride_h
    weight_ptr,  # (V, H), row stride stride_w
    bias_ptr,  # (V,) or None
    targets_ptr,  # (B·L,) integer
    rows_ptr,  # (N,) int64: flat indices of the rows with a gradient
    lse_ptr,  # (B·L,) fp32: logsumexp from the forward
    coef_ptr,  # (B,) fp32: grad_elbo[b] · w_b
    grad_hidden_ptr,  # (N, H) fp32 accumulator (compact rows), or None
    grad_weight_ptr,  # (V, H) fp32 accumulator, or None
    grad_bias_ptr,  # (V,) fp32 accumulator, or None
    N, H, V, L,
    stride_h, stride_w,
    softcap,
    NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_row_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_row_tiles  # row tiles fastest: neighbours share the W tile
    pid_v = pid // num_row_tiles

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    rows = tl.load(rows_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + rows // L, mask=row_mask, other=0.0)
    h_rows = hidden_ptr + rows * stride_h

    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    w_cols = weight_ptr + cols.to(tl.int64) * stride_w

    # Recompute the logits of the tile; the softmax needs only the forward's logsumexp.
    acc = _logit_tile(h_rows, w_cols, row_mask, col_mask, H, BLOCK_N, BLOCK_V, BLOCK_H, EVEN_V, EVEN_H,
                      UPCAST, DOT_PRECISION)
    z = _finish_logits(acc, bias_ptr, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_V)
    prob = tl.exp2((z - lse[:, None]) * _LOG2E)
    onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
    # ∂loss/∂z = coef · (onehot - softmax); rows past N (coef 0) are forced to exact zeros.
    dz = tl.where(row_mask[:, None], coef[:, None] * (onehot - prob), 0.0)
    if HAS_SOFTCAP:  # d(cap · tanh(u / cap))/du = 1 - tanh², and tanh = z / cap
        capped = z / softcap
        if not EVEN_V:
            capped = tl.where(col_mask[None, :], capped, 0.0)  # z = -inf past V
        dz = dz * (1.0 - capped * capped)
    if not EVEN_V:
        dz = tl.where(col_mask[None, :], dz, 0.0)

    if NEED_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")

    if NEED_HIDDEN or NEED_WEIGHT:
        if UPCAST:
            dz_mm = dz  # the interpreter multiplies in fp32
        else:
            dz_mm = dz.to(weight_ptr.dtype.element_ty)  # tensor-core operand, as the torch backend rounds dz
        num_h_tiles = tl.cdiv(H, BLOCK_H)
        offs_h = tl.arange(0, BLOCK_H)
        for i in range(0, num_h_tiles):
            # Rotate the starting chunk so the row tiles sharing this W tile spread their atomics.
            ks = ((i + pid_n) % num_h_tiles) * BLOCK_H + offs_h
            in_h = ks < H
            if NEED_HIDDEN:
                w = _load_tile(w_cols[:, None] + ks[None, :], col_mask, in_h, not EVEN_V, not EVEN_H, UPCAST)
                grad_h = tl.dot(dz_mm, w, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_H)
                gh_ptrs = grad_hidden_ptr + offs_n.to(tl.int64)[:, None] * H + ks[None, :]
                tl.atomic_add(gh_ptrs, grad_h, mask=row_mask[:, None] & in_h[None, :], sem="relaxed")
            if NEED_WEIGHT:
                h = _load_tile(h_rows[:, None] + ks[None, :], row_mask, in_h, True, not EVEN_H, UPCAST)
                grad_w = tl.dot(tl.trans(dz_mm), h, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_H)
                gw_ptrs = grad_weight_ptr + cols.to(tl.int64)[:, None] * H + ks[None, :]
                tl.atomic_add(gw_ptrs, grad_w, mask=col_mask[:, None] & in_h[None, :], sem="relaxed")


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
    splits = max(1, cdiv(4 * sms, cdiv(N, 128)))
    split = cdiv(cdiv(V, splits), _SPLIT_QUANTUM) * _SPLIT_QUANTUM
    return min(V, max(split, _MIN_SPLIT))


def _flat_rows(hidden: torch.Tensor) -> torch.Tensor:
    """(B·L, H) view of hidden with unit stride along H (a copy only if no such view exists)."""
    B, L, H = hidden.shape
    flat = hidden.reshape(B * L, H)
    if H > 1 and flat.stride(1) != 1:
        flat = flat.contiguous()
    return flat


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def fused_elbo_loss_forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size, *,
                            v_split: int | None = None):
    """(ℓ (B,) fp32, lse (B, L) fp32).  ``chunk_size`` (the torch backend's rows per chunk) is ignored:
    the tiles come from the autotuner.  ``v_split`` overrides the vocabulary split (tests)."""
    B, L, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    flat_hidden = _flat_rows(hidden)
    weight = _unit_stride(weight)
    bias = None if bias is None else bias.contiguous()
    flat_targets = targets.reshape(B * L)
    flat_masked = masked.reshape(B * L)
    rows = flat_masked.nonzero().squeeze(1)
    N = rows.numel()
    segment = torch.zeros(B + 1, dtype=torch.int64, device=device)
    torch.cumsum(masked.sum(dim=1), dim=0, out=segment[1:])
    lse = torch.zeros(B * L, dtype=torch.float32, device=device)
    elbo = torch.empty(B, dtype=torch.float32, device=device)
    if B == 0:
        return elbo, lse.view(B, L)
    split = max(1, min(v_split or _pick_split(N, V, device), V))
    S = cdiv(V, split)
    split_max = torch.empty(N, S, dtype=torch.float32, device=device)
    split_sum = torch.empty(N, S, dtype=torch.float32, device=device)
    target_logit = torch.empty(N, dtype=torch.float32, device=device)
    block_s = triton.next_power_of_2(S)
    with device_guard(device):
        if N > 0:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), S)  # noqa: E731
            _fused_elbo_loss_fwd_kernel[grid](
                flat_hidden, weight, bias, flat_targets, rows, split_max, split_sum, target_logit,
                N, H, V, split, S, flat_hidden.stride(0), weight.stride(0),
                0.0 if softcap is None else float(softcap),
                DOT_PRECISION=_dot_precision(hidden.dtype),
            )
        _fused_elbo_loss_reduce_kernel[(B,)](
            split_max, split_sum, target_logit, rows, segment, elbo_weight, elbo, lse, S,
            BLOCK_R=max(16, min(128, 4096 // block_s)), BLOCK_S=block_s,
        )
    return elbo, lse.view(B, L)


def fused_elbo_loss_backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap,
                             chunk_size, need_hidden, need_weight, need_bias):
    """(grad_hidden (B, L, H) | empty, grad_weight (V, H) | empty, grad_bias (V,) | empty)."""
    B, L, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    need_bias = need_bias and bias is not None
    # The per-row coefficient c_b · w_b / D of SPEC §4: grad_elbo carries -c_b / D from the objective.
    coef = (grad_elbo.float() * elbo_weight.float()).contiguous()
    active = masked & (coef != 0).unsqueeze(1)
    rows = active.reshape(B * L).nonzero().squeeze(1)
    N = rows.numel()
    flat_hidden = _flat_rows(hidden)
    weight = _unit_stride(weight)
    grad_hidden_acc = torch.zeros(N, H, dtype=torch.float32, device=device) if need_hidden else None
    grad_weight_acc = torch.zeros(V, H, dtype=torch.float32, device=device) if need_weight else None
    grad_bias_acc = torch.zeros(V, dtype=torch.float32, device=device) if need_bias else None
    if N > 0 and (need_hidden or need_weight or need_bias):
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)  # noqa: E731
        with device_guard(device):
            _fused_elbo_loss_bwd_kernel[grid](
                flat_hidden, weight, None if bias is None else bias.contiguous(), targets.reshape(B * L),
                rows, lse.reshape(B * L), coef, grad_hidden_acc, grad_weight_acc, grad_bias_acc,
                N, H, V, L, flat_hidden.stride(0), weight.stride(0),
                0.0 if softcap is None else float(softcap),
                NEED_HIDDEN=bool(need_hidden), NEED_WEIGHT=bool(need_weight), NEED_BIAS=bool(need_bias),
                DOT_PRECISION=_dot_precision(hidden.dtype),
            )
    if need_hidden:
        # Returned as allocated (a custom op's outputs may not be views).
        grad_hidden = torch.zeros(B, L, H, dtype=hidden.dtype, device=device)
        grad_hidden.view(B * L, H).index_copy_(0, rows, grad_hidden_acc.to(hidden.dtype))
    else:
        grad_hidden = hidden.new_empty(0)
    return (
        grad_hidden,
        grad_weight_acc.to(weight.dtype) if need_weight else weight.new_empty(0),
        grad_bias_acc.to(bias.dtype) if need_bias else weight.new_empty(0),
    )
