"""Independent, reproducible seeds for the streams of a run (rollout chunks, masks, warm-up batches)."""
from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. ``(seed, step, stream)``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
