"""Philox4x32-10 in vectorised PyTorch, bit-identical to Triton's ``tl.randint`` / ``tl.rand``.

Every backend of bgpo (this module, the Triton kernels, the C++ CPU and CUDA kernels) draws from one
counter-based stream, so a random mask is a pure function of its arguments and can be regenerated
anywhere instead of stored.  The generator (SPEC §5, Salmon et al. 2011, Random123):

* key ``(k0, k1)`` = low and high 32 bits of the 64-bit seed (a negative seed is taken in two's
  complement, which is what Triton does when it sign-extends a 32-bit seed);
* counter ``(c0, c1, c2, c3)`` = low and high 32 bits of the 64-bit offset, then ``0, 0``;
* ten rounds of the Philox S-box with the multipliers ``0xD2511F53``/``0xCD9E8D57`` and the Weyl
  key increments ``0x9E3779B9``/``0xBB67AE85``;
* ``randint`` is the first output word; ``rand`` reinterprets it as int32, folds negatives with
  ``~x`` and multiplies by the fp32 constant ``4.6566127342e-10`` (one ulp below 2**-31, so the
  result lies in [0, 1)).

All words are held in int64 tensors with values in [0, 2**32).  The 32x32 -> 64-bit products needed
by ``umulhi`` would overflow int64, so the high word is assembled from two 16-bit halves of the
multiplicand (see ``_mulhilo``).
"""
from __future__ import annotations

import torch

__all__ = ["philox4x32", "randint", "rand", "seed_to_key", "RAND_SCALE"]

_MASK32 = 0xFFFFFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_ROUNDS = 10

# fp32(4.6566127342e-10): the constant Triton's ``uint_to_uniform_float`` multiplies by.
RAND_SCALE = torch.tensor(4.6566127342e-10, dtype=torch.float32).item()


def seed_to_key(seed: int) -> tuple[int, int]:
    """Split a 64-bit seed (signed or unsigned) into the Philox key words ``(k0, k1)``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected a Python int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: expected a 64-bit integer, got {seed}")
    return seed & _MASK32, (seed >> 32) & _MASK32


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * m`` for a uint32 tensor ``a`` and a uint32 constant ``m``.

    With ``a = ah * 2**16 + al``: ``a*m = 2**16 * (ah*m + (al*m >> 16)) + (al*m & 0xffff)``, and each
    partial product is below 2**48, so ``hi = (ah*m + (al*m >> 16)) >> 16`` is exact in int64.  The low
    word is exact as well: int64 multiplication wraps modulo 2**64, which leaves the low 32 bits intact.
    """
    al = a & 0xFFFF
    ah = a >> 16
    hi = (ah * m + ((al * m) >> 16)) >> 16
    lo = (a * m) & _MASK32
    return hi, lo


def philox4x32(
    seed: int, c0: torch.Tensor, c1: torch.Tensor | int = 0, c2: int = 0, c3: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four output words of Philox4x32-10 for key ``seed`` and counters ``(c0, c1, c2, c3)``.

    ``c0`` is an integer tensor of uint32 values (held in int64); the other counters broadcast.
    """
    k0, k1 = seed_to_key(seed)
    x0 = c0.to(torch.int64)
    x1 = torch.as_tensor(c1, dtype=torch.int64, device=x0.device).expand_as(x0)
    x2 = torch.full_like(x0, c2)
    x3 = torch.full_like(x0, c3)
    for _ in range(_ROUNDS):
        hi0, lo0 = _mulhilo(x0, _PHILOX_M0)
        hi2, lo2 = _mulhilo(x2, _PHILOX_M1)
        x0, x1, x2, x3 = hi2 ^ x1 ^ k0, lo2, hi0 ^ x3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return x0, x1, x2, x3


def _split_offset(offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if offset.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offset: expected an int32 or int64 tensor, got {offset.dtype}")
    if offset.dtype == torch.int32:
        # Triton takes a 32-bit offset as uint32 with a zero high counter word.
        return offset.to(torch.int64) & _MASK32, torch.zeros_like(offset, dtype=torch.int64)
    return offset & _MASK32, (offset >> 32) & _MASK32


def randint(seed: int, offset: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offset)``: one uint32 word per offset, returned in an int64 tensor."""
    c0, c1 = _split_offset(offset)
    return philox4x32(seed, c0, c1)[0]


def rand(seed: int, offset: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offset)``: fp32 uniforms in [0, 1), bit-identical to Triton's."""
    word = randint(seed, offset)
    as_int32 = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(as_int32 < 0, -as_int32 - 1, as_int32)
    return folded.to(torch.float32) * RAND_SCALE
