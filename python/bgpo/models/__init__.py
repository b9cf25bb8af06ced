"""Models for bgpo: LLaDA, an adapter for Hugging Face masked diffusion LMs, activation checkpointing.

Every model handed to the trainer or the sampler follows ``MaskedDiffusionLM`` (``protocol.py``).
"""
from .adapter import HFMaskedDiffusionAdapter, UnsupportedModelError
from .checkpointing import enable_activation_checkpointing, find_blocks
from .config import LLaDAConfig
from .llada import LLaDAModelLM
from .loading import llada_state_dict, load_llada_weights
from .protocol import MaskedDiffusionLM

__all__ = [
    "MaskedDiffusionLM",
    "LLaDAConfig",
    "LLaDAModelLM",
    "load_llada_weights",
    "llada_state_dict",
    "HFMaskedDiffusionAdapter",
    "UnsupportedModelError",
    "enable_activation_checkpointing",
    "find_blocks",
]
