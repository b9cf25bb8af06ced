"""Triton kernels of bgpo (being written)."""


def register() -> None:
    """Register the Triton backends in bgpo.backends."""
