"""The sampler's prefix KV cache for Hugging Face models (``HFMaskedDiffusionAdapter``).

Fast-dLLM's prefix cache asks three things of a model: a forward over the whole sequence (B, T) that
returns every layer's keys and values; a forward over the tokens at positions s .. T-1 that attends to
the cached keys of positions 0 .. s-1 and to its own, at positions s .. T-1; no causal mask in either.
A Hugging Face model's own cache is autoregressive -- new keys go after the cached ones, at positions
continuing the cache's length -- and that is exactly the second forward once the cache is cut back to
the prefix 0 .. s-1: positions continue from s and the suffix's keys are the slice's own.  The dual
cache would need cached suffix keys *after* the slice's, which appending cannot express, so a Hugging
Face model offers ``"prefix"`` only (``bgpo.models.LLaDAModelLM`` offers both).

Two cache formats are handled: a transformers ``Cache`` (cut in place with ``crop(-n)``, the number of
tokens to drop, which means the same in transformers 4.4x and 5.x) and the legacy per-layer
``(key, value)`` tuples, (B, heads, T, head_dim), of OLMo-derived remote code such as LLaDA's (sliced
to views; the refresh's tuples are kept, the model's returned ones dropped).

Whether a model really behaves so cannot be read from its code: OLMo-derived remote code, LLaDA's
among it, builds a causal attention bias whenever it is given past keys.  So the adapter checks once,
on its first cached forward: it reruns the refresh-time tokens s .. T-1 against the cut cache -- where
the cache is exact -- and compares with the refresh's hidden states row by row (``verify``).  A model
that fails is refused with the measured error rather than sampled from silently wrong.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["HFPrefixCache", "cache_keyword", "returned_cache", "prefix_view", "relative_row_error",
           "VERIFY_TOLERANCE"]

#: Largest per-row relative error ``|cached - full| / |full|`` accepted by the one-time check, by the
#: dtype of the hidden states: a cached forward differs from the full one only by summation order.
VERIFY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


class HFPrefixCache:
    """One generation's prefix cache: the model's cache object after the block's full forward (the
    refresh), with the tokens it saw; ``hidden`` keeps the refresh's hidden states until the model's
    cache has been verified (``HFMaskedDiffusionAdapter.hidden_states``)."""

    def __init__(self):
        self.past = None
        self.input_ids: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None

    def store(self, past, input_ids: torch.Tensor, hidden: torch.Tensor | None) -> None:
        # A copy: the sampler writes its chosen tokens into the sequence it passed, in place.
        self.past, self.input_ids, self.hidden = past, input_ids.clone(), hidden


def cache_keyword(model: nn.Module) -> str:
    """The forward's name for the cache argument: ``cache`` (transformers >= 5) or ``past_key_values``."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output):
    """The cache a forward returned (a ``Cache`` or per-layer tuples), or None."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def prefix_view(past, length: int):
    """The cache cut back to its first ``length`` positions: a ``Cache`` in place, tuples as views."""
    if hasattr(past, "crop") and hasattr(past, "get_seq_length"):
        cached = int(past.get_seq_length())
        if cached < length:
            raise ValueError(f"cache_start: the cache holds {cached} positions, {length} were asked for")
        if cached > length:
            past.crop(length - cached)  # a negative count: drop that many from the end
        return past
    if isinstance(past, (list, tuple)) and all(isinstance(layer, (list, tuple)) for layer in past):
        return [tuple(t[..., :length, :] for t in layer) for layer in past]
    raise TypeError(f"cache: cannot cut a {type(past).__name__} (expected a transformers Cache or (key, value) "
                    "tuples per layer)")


def relative_row_error(cached: torch.Tensor, full: torch.Tensor) -> float:
    """max over rows of ``|cached - full| / |full|`` (2-norms over the hidden dimension), in fp32."""
    cached, full = cached.detach().float(), full.detach().float()
    scale = full.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return float(((cached - full).norm(dim=-1) / scale).max()) if full.numel() else 0.0
