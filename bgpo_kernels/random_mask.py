"""Triton kernel of ``bgpo.random_mask``: token ids (B, C) -> noisy ids, masked positions, MC weights.

One launch, one program per sequence.  Every random number is drawn inside the kernel with
``tl.randint`` / ``tl.rand`` at the Philox offsets that ``bgpo.ops.random_mask`` defines (its module
docstring is the single definition of the layout), so the result is bit-identical to the torch path
``random_mask_torch`` for both schemes:

* pass 1 counts the maskable positions L of the sequence;
* ``stratified``: the sequence draw ``randint(seq, 2**31)`` gives ``K = r mod (L·n)`` and
  ``l_j = ((round((K + j·L)/n) - 1) mod L) + 1`` in 64-bit integers (the torch path's formula; the
  modulo of a value that may be -1 is taken as ``(x + L) mod L`` because Triton's ``%`` truncates).
  Exactly ``l_j`` positions are masked: those whose composite key ``randint(seq, j, i) · 2**KEY_BITS + i``
  ranks lowest among the maskable columns (``i < 2**KEY_BITS``, so the order is the torch path's
  ``draw · 2**16 + i``: by draw, ties to the lower column).  Instead of sorting, the kernel finds
  the l_j-th smallest key by a radix select -- ``32 + KEY_BITS`` counting passes that set the
  threshold one bit at a time from the top (the largest p with #{key < p} < l_j is that key, as the
  keys are distinct) -- and masks ``key <= p``.  O((32 + log2 C) · C) work, no scratch memory.
* ``bernoulli``: ``u = rand(seq, 2**31 + j)`` (or ``(rand(seq, 2**31) + j) · fp32(1/n)`` with
  ``stratify_t``), ``t = 1 - fp32(1 - t_min) · u`` -- a multiply, then a subtract: on a GPU the
  kernel is launched with ``enable_fp_fusion=False`` so the two are never contracted into an FMA,
  which would round once instead of twice and break bit-exactness.  Position i is masked iff
  ``rand(seq, j, i) < t``.
* Weights are IEEE divisions (``tl.math.div_rn``, correctly rounded like torch's ``/``):
  ``L / l_j`` or ``1 / t``, then ``/ L`` with ``length_normalize``; 1 for a sequence with L = 0.

When the row fits one block (``SINGLE_TILE``) the keys stay in registers across the counting
passes; longer rows are processed tile by tile and the keys are recomputed on every pass
(ten Philox rounds are cheaper than a round trip through global memory for a rare case).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_guard, is_interpreter

__all__ = ["_random_mask_fwd_kernel", "random_mask_forward"]

INTERPRET = is_interpreter()  # Triton decides interpreter or GPU when the kernels are decorated
SEQUENCE_DRAW = 2**31
# Largest row held in registers by one program (int64 keys: 2048 / 256 threads = 8 per thread).
MAX_BLOCK_C = 2048


@triton.jit
def _column_keys(seed, col_base, cols, maskable, KEY_BITS: tl.constexpr):
    """Composite ranking keys ``randint(offset) << KEY_BITS | column``; unmaskable columns sort last."""
    draw = tl.randint(seed, col_base + cols.to(tl.int64)).to(tl.int64)  # uint32 -> int64, zero-extended
    keys = (draw << KEY_BITS) | cols.to(tl.int64)
    return tl.where(maskable, keys, 1 << 62)


@triton.heuristics({"SINGLE_TILE": lambda args: args["C"] <= args["BLOCK_C"]})
@triton.jit(do_not_specialize=["mask_id", "seed", "sample_index", "num_samples"])
def _random_mask_fwd_kernel(
    ids_ptr,  # (B, C) integer token ids
    maskable_ptr,  # (B, C) uint8 (a view of the bool tensor)
    sequence_ids_ptr,  # (B,) int64
    noisy_ptr,  # (B, C) out, dtype of ids
    masked_ptr,  # (B, C) out, uint8 view of a bool tensor
    weight_ptr,  # (B,) out, fp32
    C,
    stride_ids,
    stride_maskable,
    stride_noisy,
    stride_masked,
    mask_id,
    seed,
    sample_index,
    num_samples,
    span,  # fp32(1 - t_min)
    inv_n,  # fp32(1 / num_samples)
    STRATIFIED: tl.constexpr,
    STRATIFY_T: tl.constexpr,
    LENGTH_NORMALIZE: tl.constexpr,
    KEY_BITS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ids_row = ids_ptr + b * stride_ids
    maskable_row = maskable_ptr + b * stride_maskable
    noisy_row = noisy_ptr + b * stride_noisy
    masked_row = masked_ptr + b * stride_masked
    offs = tl.arange(0, BLOCK_C)

    sequence = tl.load(sequence_ids_ptr + b).to(tl.int64)
    seq_base = sequence << 32
    col_base = seq_base + sample_index.to(tl.int64) * 65536
    sequence_draw = seq_base + 2147483648  # 2**31: the sequence-level draws

    # ---- pass 1: L, the number of maskable positions --------------------------------------------
    if SINGLE_TILE:
        maskable_1 = tl.load(maskable_row + offs, mask=offs < C, other=0) != 0
        L = tl.sum(maskable_1.to(tl.int64), axis=0)
    else:
        L = tl.zeros((), dtype=tl.int64)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            L += tl.sum((tl.load(maskable_row + cols, mask=cols < C, other=0) != 0).to(tl.int64), axis=0)
    L_f = L.to(tl.float32)

    # ---- per-sequence draw: how many to mask / at which rate, and the weight ------------------------
    if STRATIFIED:
        n = num_samples.to(tl.int64)
        span_i = tl.maximum(L * n, 1)
        K = tl.randint(seed, sequence_draw).to(tl.int64) % span_i
        rounded = (2 * (K + sample_index.to(tl.int64) * L) + n) // (2 * n)
        L_safe = tl.maximum(L, 1)
        count = tl.where(L > 0, (rounded - 1 + L_safe) % L_safe + 1, 0)
        weight = tl.math.div_rn(L_f, tl.maximum(count, 1).to(tl.float32))
    else:
        if STRATIFY_T:
            u = tl.rand(seed, sequence_draw)
            u = (u + sample_index.to(tl.float32)) * inv_n
        else:
            u = tl.rand(seed, sequence_draw + sample_index.to(tl.int64))
        scaled = span * u  # kept a separate rounding: the launch disables FMA contraction
        t = 1.0 - scaled
        weight = tl.math.div_rn(1.0, t)
    if LENGTH_NORMALIZE:
        weight = tl.math.div_rn(weight, tl.maximum(L, 1).to(tl.float32))
    weight = tl.where(L > 0, weight, 1.0)
    tl.store(weight_ptr + b, weight)

    # ---- stratified: the count-th smallest key, by radix select ------------------------------------
    if STRATIFIED:
        if SINGLE_TILE:
            keys_1 = _column_keys(seed, col_base, offs, maskable_1, KEY_BITS)
        threshold = tl.zeros((), dtype=tl.int64)  # invariant: #{key < threshold} < count
        for i in range(32 + KEY_BITS):
            bit = tl.full((), 31 + KEY_BITS, tl.int64) - i
            candidate = threshold | (tl.full((), 1, tl.int64) << bit)
            if SINGLE_TILE:
                below = tl.sum((keys_1 < candidate).to(tl.int64), axis=0)
            else:
                below = tl.zeros((), dtype=tl.int64)
                for c0 in range(0, C, BLOCK_C):
                    cols = c0 + offs
                    m = tl.load(maskable_row + cols, mask=cols < C, other=0) != 0
                    keys = _column_keys(seed, col_base, cols, m, KEY_BITS)
                    below += tl.sum((keys < candidate).to(tl.int64), axis=0)
            threshold = tl.where(below < count, candidate, threshold)

    # ---- pass 2: the mask and the noisy ids -----------------------------------------------------------
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        in_row = cols < C
        if SINGLE_TILE:
            m = maskable_1
        else:
            m = tl.load(maskable_row + cols, mask=in_row, other=0) != 0
        if STRATIFIED:
            if SINGLE_TILE:
                keys = keys_1
            else:
                keys = _column_keys(seed, col_base, cols, m, KEY_BITS)
            hit = m & (keys <= threshold) & (count > 0)
        else:
            hit = m & (tl.rand(seed, col_base + cols.to(tl.int64)) < t)
        ids = tl.load(ids_row + cols, mask=in_row, other=0)
        noisy = tl.where(hit, mask_id.to(ids.dtype), ids)
        tl.store(noisy_row + cols, noisy, mask=in_row)
        tl.store(masked_row + cols, hit.to(tl.uint8), mask=in_row)


def _key_bits(num_columns: int) -> int:
    """Bits that hold a column index in [0, num_columns)."""
    return max(1, (num_columns - 1).bit_length())


def random_mask_forward(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    sequence_ids: torch.Tensor,
    mask_id: int,
    seed: int,
    sample_index: int,
    num_samples: int,
    scheme: str,
    t_min: float,
    stratify_t: bool,
    length_normalize: bool,
    *,
    block_c: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher with the signature of ``bgpo.ops.random_mask.random_mask_torch`` (arguments checked there).

    ``block_c`` overrides the tile width (a power of two >= 16; tests use it to exercise the tiled path).
    """
    B, C = input_ids.shape
    device = input_ids.device
    noisy = torch.empty_like(input_ids, memory_format=torch.contiguous_format)
    masked = torch.empty((B, C), dtype=torch.bool, device=device)
    weight = torch.empty(B, dtype=torch.float32, device=device)
    if B == 0:
        return noisy, masked, weight
    if C == 0:
        return noisy, masked, weight.fill_(1.0)
    if input_ids.stride(1) != 1:
        input_ids = input_ids.contiguous()
    maskable_u8 = maskable.contiguous().view(torch.uint8)
    sequence_ids = sequence_ids.to(torch.int64).contiguous()
    if block_c is None:
        block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    block_c = max(16, block_c)
    span = torch.tensor(1.0 - t_min, dtype=torch.float32).item()
    inv_n = torch.tensor(1.0 / num_samples, dtype=torch.float32).item()
    extra = {} if INTERPRET else {"enable_fp_fusion": False, "num_warps": 8 if block_c > 1024 else 4}
    # The seed is a 64-bit key: pass it so Triton sees a 64-bit integer even when it would fit in 32
    # bits (a negative 32-bit seed is sign-extended by tl.randint, which is the same key).
    with device_guard(device):
        _random_mask_fwd_kernel[(B,)](
            input_ids, maskable_u8, sequence_ids, noisy, masked.view(torch.uint8), weight,
            C, input_ids.stride(0), maskable_u8.stride(0), noisy.stride(0), C,
            int(mask_id), int(seed), int(sample_index), int(num_samples), span, inv_n,
            STRATIFIED=scheme == "stratified", STRATIFY_T=bool(stratify_t),
            LENGTH_NORMALIZE=bool(length_normalize), KEY_BITS=_key_bits(C), BLOCK_C=block_c,
            **extra,
        )
    return noisy, masked, weight
