"""``bgpo.random_mask``: one Monte Carlo sample of the forward (masking) process, reproducibly.

A mask is a pure function of ``(seed, sequence id, sample index j, n_t, column, maskable pattern)``.
Every backend draws from Philox4x32-10 (``bgpo.philox``) at the same 64-bit offsets, so the torch,
Triton, C++ and CUDA paths give bit-identical masks and a mask can be regenerated instead of stored
(the old policy and the current policy see the same noisy sample; off-policy updates re-draw it).

Offset layout (the one place it is defined)::

    offset = sequence_id * 2**32 + c
    c = j * 2**16 + i      the draw for column i (0 <= i < 2**16) in MC sample j (0 <= j < 2**15)
    c = 2**31 + d          sequence-level draw d (per sequence, never collides with a column draw)

Schemes (SPEC §1).  ``L`` is the number of maskable positions of the sequence, ``n`` = num_samples.

* ``stratified`` (default; LLaDA's ``get_log_likelihood``, VRPO's allocation): one offset per
  sequence, shared by its n samples: ``r = randint(draw 0)``, ``K = r mod (L*n)`` (so ``k = K/n`` is
  uniform on a 1/n grid in [0, L)), and
  ``l_j = ((round((K + j*L) / n) - 1) mod L) + 1`` with round-half-up done in integers,
  ``round(a/n) = floor((2a + n) / (2n))``.  Exactly ``l_j`` positions are masked: those whose column
  draw ``randint(j, i)`` ranks lowest among the maskable positions (ties go to the lower column).
  Weight ``L / l_j``.
* ``bernoulli`` (paper Eq. 4): ``u = rand(draw j)``, or with ``stratify_t`` ``u = (rand(draw 0) + j) * fp32(1/n)``;
  ``t_j = 1 - fp32(1 - t_min) * u`` in fp32 (a multiply then a subtract, never fused), so
  ``t_j`` lies in ``(t_min, 1]``; position i is masked iff ``rand(j, i) < t_j``.  Weight ``1 / t_j``.

Both make ``E[w * sum_{masked} f(i)] = sum_i f(i)`` exactly, the unbiasedness the ELBO relies on.
A sequence with no maskable position gets weight 1 and no mask (its ELBO term is an empty sum).
``length_normalize`` divides the weight by L (the per-token ELBO one public port uses; default off).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .. import philox
from ..backends import Backend, register_backend, resolve_backend
from ._checks import check_bool, check_device, check_int, check_real, check_shape, check_tensor, check_values

__all__ = ["random_mask", "MaskedSample", "random_mask_torch", "SCHEMES"]

SCHEMES = ("stratified", "bernoulli")
MAX_COLUMNS = 2**16
MAX_SAMPLES = 2**15
MAX_SEQUENCE_ID = 2**31
SEQUENCE_DRAW = 2**31


class MaskedSample(NamedTuple):
    noisy_ids: torch.Tensor  # (B, L) input ids with masked positions replaced by mask_id
    masked: torch.Tensor  # (B, L) bool, the positions whose clean token the ELBO scores
    elbo_weight: torch.Tensor  # (B,) fp32, the MC weight w_j (L/l or 1/t, optionally / L)
    # With several sample indices (k of them) every field gains a leading (k,) dimension.


def column_offsets(sequence_ids: torch.Tensor, sample_index: int, num_columns: int) -> torch.Tensor:
    """(B, num_columns) int64 Philox offsets of the column draws of sample ``sample_index``."""
    columns = torch.arange(num_columns, device=sequence_ids.device, dtype=torch.int64)
    return (sequence_ids.to(torch.int64) << 32).unsqueeze(1) + (sample_index << 16) + columns


def sequence_offsets(sequence_ids: torch.Tensor, draw: int) -> torch.Tensor:
    """(B,) int64 Philox offsets of the sequence-level draw ``draw``."""
    return (sequence_ids.to(torch.int64) << 32) + SEQUENCE_DRAW + draw


def stratified_mask_counts(
    seed: int, sequence_ids: torch.Tensor, num_maskable: torch.Tensor, sample_index: int, num_samples: int
) -> torch.Tensor:
    """l_j for every sequence: how many positions sample ``sample_index`` masks (0 where L = 0)."""
    L = num_maskable.to(torch.int64)
    span = (L * num_samples).clamp_min(1)
    K = philox.randint(seed, sequence_offsets(sequence_ids, 0)) % span
    rounded = (2 * (K + sample_index * L) + num_samples) // (2 * num_samples)
    return torch.where(L > 0, (rounded - 1) % L.clamp_min(1) + 1, torch.zeros_like(L))


def bernoulli_mask_rates(
    seed: int, sequence_ids: torch.Tensor, sample_index: int, num_samples: int, t_min: float, stratify_t: bool
) -> torch.Tensor:
    """t_j for every sequence (fp32, in (t_min, 1])."""
    if stratify_t:
        u0 = philox.rand(seed, sequence_offsets(sequence_ids, 0))
        inv_n = torch.tensor(1.0 / num_samples, dtype=torch.float32).item()
        u = (u0 + float(sample_index)) * inv_n
    else:
        u = philox.rand(seed, sequence_offsets(sequence_ids, sample_index))
    span = torch.tensor(1.0 - t_min, dtype=torch.float32).item()
    return 1.0 - u * span


def random_mask_torch(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference implementation (and the CPU fallback); see the module docstring."""
    B, C = input_ids.shape
    num_maskable = maskable.sum(dim=1)
    offsets = column_offsets(sequence_ids, sample_index, C)
    if scheme == "stratified":
        counts = stratified_mask_counts(seed, sequence_ids, num_maskable, sample_index, num_samples)
        # Rank the maskable columns by their draw; the composite key draw * 2**16 + column is unique,
        # so ties in the 32-bit draw go to the lower column.  Unmaskable columns sort last.
        keys = philox.randint(seed, offsets) * MAX_COLUMNS + torch.arange(C, device=input_ids.device)
        keys = keys.masked_fill(~maskable, 2**62)
        order = keys.argsort(dim=1)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(C, device=input_ids.device).expand(B, C))
        masked = maskable & (rank < counts.unsqueeze(1))
        weight = num_maskable.to(torch.float32) / counts.clamp_min(1).to(torch.float32)
    else:
        t = bernoulli_mask_rates(seed, sequence_ids, sample_index, num_samples, t_min, stratify_t)
        masked = maskable & (philox.rand(seed, offsets) < t.unsqueeze(1))
        weight = 1.0 / t
    if length_normalize:
        weight = weight / num_maskable.clamp_min(1).to(torch.float32)
    weight = torch.where(num_maskable > 0, weight, torch.ones_like(weight))
    noisy = input_ids.masked_fill(masked, mask_id)
    return noisy, masked, weight


@torch.library.custom_op("bgpo::random_mask", mutates_args=())
def _random_mask_op(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = resolve_backend("random_mask", backend, input_ids.device).impl
    return impl(
        input_ids, maskable, sequence_ids, mask_id, seed, sample_index, num_samples,
        scheme, t_min, stratify_t, length_normalize,
    )


@_random_mask_op.register_fake
def _(input_ids, maskable, sequence_ids, mask_id, seed, sample_index, num_samples, scheme, t_min,
      stratify_t, length_normalize, backend):
    weight = input_ids.new_empty(input_ids.shape[0], dtype=torch.float32)
    return torch.empty_like(input_ids), torch.empty_like(maskable), weight


register_backend("random_mask", Backend("torch", random_mask_torch, available=lambda device: None))


def random_mask(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_id: int,
    seed: int,
    sample_index: int | Sequence[int],
    num_samples: int,
    sequence_ids: torch.Tensor | None = None,
    scheme: str = "stratified",
    t_min: float = 1e-3,
    stratify_t: bool = False,
    length_normalize: bool = False,
    backend: str = "auto",
) -> MaskedSample:
    """Draw MC sample ``sample_index`` of ``num_samples`` of the masking process for a batch.

    Args:
        input_ids: (B, L) integer token ids (prompt and response, or the response alone).
        maskable: (B, L) bool, True where a token may be masked: valid response tokens.  Prompt and
            padding positions must be False; they are never masked.
        mask_id: the mask token id (LLaDA: 126336).
        seed: 64-bit integer seed (the same seed for θ and θ_old; a trainer derives it from the step).
        sample_index: j in [0, num_samples), the MC sample; or a non-empty sequence of k such indices,
            to draw k samples at once (each exactly the sample a call with that index alone draws).
        num_samples: n_t, the number of MC samples per sequence (the stratified scheme spreads the
            masked counts of the n_t samples evenly).
        sequence_ids: (B,) integers in [0, 2**31) naming each sequence; the mask depends on the id,
            not the row, so batch order and micro-batching do not change it.  Default ``arange(B)``.
        scheme: ``"stratified"`` (exactly l_j masked, weight L/l_j) or ``"bernoulli"`` (each position
            with probability t_j, weight 1/t_j).
        t_min: lower end of t_j for ``bernoulli``: t_j in (t_min, 1].
        stratify_t: ``bernoulli`` only: t_j = 1 - (1 - t_min)(u + j)/n_t from one draw u per sequence,
            instead of i.i.d. t_j.
        length_normalize: divide the weight by L (per-token ELBO); default off (SPEC §1).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpu"`` (C++); all give the same bits.

    Returns:
        ``MaskedSample(noisy_ids, masked, elbo_weight)``; with a sequence of k sample indices, each
        field is stacked along a leading (k,) dimension: (k, B, L), (k, B, L), (k, B).
    """
    check_tensor("input_ids", input_ids, dims=2, integer=True)
    B, C = input_ids.shape
    check_tensor("maskable", maskable, dtype=torch.bool)
    check_shape("maskable", maskable, (B, C))
    check_device("maskable", maskable, input_ids)
    if C > MAX_COLUMNS:
        raise ValueError(f"input_ids: at most {MAX_COLUMNS} columns are supported, got {C}")
    # A token id of input_ids' dtype, below 2**31 (the backends hold it in 32 bits; checked here, before any
    # backend, so that no path writes a negative id or wraps 2**32 + 7 to 7).
    check_int("mask_id", mask_id, low=0, high=min(2**31, torch.iinfo(input_ids.dtype).max + 1))
    check_int("seed", seed, low=-(2**63), high=2**63)
    check_int("num_samples", num_samples, low=1, high=MAX_SAMPLES + 1)
    indices = [sample_index] if isinstance(sample_index, int) else sample_index
    if isinstance(indices, (str, bytes, torch.Tensor)) or not isinstance(indices, Sequence) or not indices:
        raise ValueError(f"sample_index: expected an int or a non-empty sequence of ints, got {sample_index!r}")
    for index in indices:
        check_int("sample_index", index, low=0, high=num_samples)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    check_real("t_min", t_min, interval=(0, 1), ends="[)")
    check_bool("stratify_t", stratify_t)
    check_bool("length_normalize", length_normalize)
    if sequence_ids is None:
        sequence_ids = torch.arange(B, device=input_ids.device)
    else:
        check_tensor("sequence_ids", sequence_ids, dims=1, integer=True)
        check_shape("sequence_ids", sequence_ids, (B,))
        check_device("sequence_ids", sequence_ids, input_ids)
        check_values("sequence_ids", (sequence_ids >= 0) & (sequence_ids < MAX_SEQUENCE_ID), "values in [0, 2**31)")
    # Several indices: one call of the op per index (the draws of sample j depend on j only), stacked.
    samples = [MaskedSample(*_random_mask_op(
        input_ids, maskable, sequence_ids.to(torch.int64), int(mask_id), int(seed), int(index),
        int(num_samples), scheme, float(t_min), bool(stratify_t), bool(length_normalize), backend,
    )) for index in indices]
    if isinstance(sample_index, int):
        return samples[0]
    return MaskedSample(*(torch.stack(field) for field in zip(*samples)))
