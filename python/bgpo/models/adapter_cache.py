"""The sampler's KV caches for Hugging Face models (``HFMaskedDiffusionAdapter``), through the model's own cache.

A Hugging Face model's cache is autoregressive: a forward with a cache of P positions appends its own keys
and values after them and, unless told otherwise, places its tokens at positions P, P+1, ...  Fast-dLLM's
caches are expressed with that and nothing else:

* **prefix** (slice s .. T-1, to the end): the cache, filled by a forward over the whole sequence (the
  refresh), is cut back to positions 0 .. s-1 before each forward; the slice's tokens then sit at s .. T-1
  and their own keys are the suffix's.  Any model with a cache can do this.
* **dual** (slice s .. e-1 with e < T): the whole refreshed cache (0 .. T-1) stays, the slice's fresh keys
  are appended after it, and the attention mask hides the cached -- stale -- copies of the slice's positions;
  the slice's tokens are placed at s .. e-1 with explicit ``position_ids``.  Keys under RoPE carry their
  positions, and attention without a causal mask does not depend on the order of the keys, so this is the
  dual cache with no copy of it.  It needs a forward that takes ``position_ids`` and honours the mask.

The cache is cut back after each forward (the appended keys dropped) in place with ``crop(-n)`` for a
transformers ``Cache`` (the number of tokens to drop: the same meaning in transformers 4.4x and 5.x); the
legacy per-layer ``(key, value)`` tuples of OLMo-derived remote code (LLaDA's) are sliced to views and the
model's returned ones dropped.

Whether a model really behaves so cannot be read from its code: OLMo-derived remote code, LLaDA's among
it, builds a causal attention bias whenever it is given past keys, and LLaDA's attention ignores masks.  So
the adapter checks each cache once, on its first cached forward: it reruns the refresh's own tokens of the
slice against the cache -- where the cache is exact -- and compares with a full forward of them row by row
(``relative_row_error``).  A model that fails is refused with the measured error, never sampled from
silently wrong.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["HFKVCache", "cache_keyword", "takes_position_ids", "returned_cache", "prefix_view",
           "relative_row_error", "VERIFY_TOLERANCE"]

#: Largest per-row relative error ``|cached - full| / |full|`` accepted by the one-time check, by the
#: dtype of the hidden states: a cached forward differs from the full one only by summation order.
VERIFY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


class HFKVCache:
    """One generation's cache: the model's cache object after the block's full forward (the refresh), the
    tokens that forward saw, and ``refreshed``: how many leading positions of the cache still hold the
    refresh's keys (a prefix forward cuts a ``Cache`` back, and what it appends is its own)."""

    def __init__(self):
        self.past = None
        self.input_ids: torch.Tensor | None = None
        self.refreshed = 0

    def store(self, past, input_ids: torch.Tensor) -> None:
        # A copy: the sampler writes its chosen tokens into the sequence it passed, in place.
        self.past, self.input_ids, self.refreshed = past, input_ids.clone(), input_ids.shape[1]

    def refresh_keys(self, length: int):
        """The cache holding the refresh's keys of positions 0 .. length-1 (cut back to them)."""
        if length > self.refreshed:
            raise ValueError(
                f"cache_start: the cache holds the refresh's keys of positions 0 .. {self.refreshed - 1} only (a "
                f"prefix forward cut it), {length} are needed: refresh it (a forward without cache_start) first"
            )
        self.refreshed = length
        return prefix_view(self.past, length)


def _parameters(model: nn.Module):
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def cache_keyword(model: nn.Module) -> str:
    """The forward's name for the cache argument: ``cache`` (transformers >= 5) or ``past_key_values``."""
    return "cache" if "cache" in _parameters(model) else "past_key_values"


def takes_position_ids(model: nn.Module) -> bool:
    """Whether the forward takes ``position_ids`` (the dual cache places its slice with them)."""
    return "position_ids" in _parameters(model)


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
