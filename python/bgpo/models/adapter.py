"""``HFMaskedDiffusionAdapter``: any Hugging Face masked diffusion LM as a ``MaskedDiffusionLM``.

LLaDA, Dream and LLaDA-MoE load with ``AutoModel.from_pretrained(..., trust_remote_code=True)``; their
forward returns full logits (B, T, V).  The trainer needs the hidden states the LM head consumes and
the head's weight instead, and computing the logits just to drop them costs O(T*V) memory.

How the hidden states are obtained without the logits: during the forward, the LM head module
(``get_output_embeddings()``) is temporarily replaced by a module that records its input and passes
it through, so the model's "logits" are its hidden states and no (T x V) product is formed.  This
works for every model whose LM head is an ``nn.Linear`` applied to the final hidden states, and
fails loudly (``UnsupportedModelError``) otherwise.

Family conventions (keyed by ``config.model_type``):

* Dream is adapted from an autoregressive model and keeps its shift: the hidden state at position
  t - 1 predicts token t (Dream's sampler does ``logits = cat([logits[:, :1], logits[:, :-1]])``).
  The adapter applies the same shift, so row t of ``hidden_states`` predicts token t for every family.
  Dream's attention takes a 4-D boolean mask rather than a (B, T) padding mask; the adapter builds it.
* LLaDA and LLaDA-MoE: no shift, (B, T) padding mask.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_cache import (VERIFY_TOLERANCE, HFPrefixCache, cache_keyword, prefix_view, relative_row_error,
                            returned_cache)
from .checkpointing import find_blocks

__all__ = ["HFMaskedDiffusionAdapter", "UnsupportedModelError"]

# model_type values whose hidden state at t - 1 predicts token t and whose attention wants 4-D masks.
_SHIFTED_FAMILIES = frozenset({"dream"})


class UnsupportedModelError(ValueError):
    """The model cannot be driven as a masked diffusion LM; the message says what is missing."""


class _RecordInput(nn.Module):
    """Stands in for the LM head during a forward: records the hidden states, returns them unchanged."""

    def __init__(self):
        super().__init__()
        self.recorded: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.recorded = hidden
        return hidden


def _module_name(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


def _first_id(value: Any) -> int | None:
    """A token id from a config or tokenizer field (some configs list several EOS ids: take the first)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


class HFMaskedDiffusionAdapter(nn.Module):
    """Wrap a Hugging Face masked diffusion LM (an ``nn.Module`` with a config and an LM head).

    Args:
        model: e.g. ``AutoModel.from_pretrained("GSAI-ML/LLaDA-8B-Instruct", trust_remote_code=True)``.
        tokenizer: consulted for ``mask_token_id`` / ``eos_token_id`` when the config lacks them.
        mask_token_id, eos_token_id: explicit ids, overriding config and tokenizer.
        shift: whether row t - 1 predicts token t (default: by family, True for Dream).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        mask_token_id: int | None = None,
        eos_token_id: int | None = None,
        shift: bool | None = None,
    ):
        super().__init__()
        self.model = model
        name = type(model).__name__
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if head is None:
            raise UnsupportedModelError(
                f"model: {name} has no LM head (get_output_embeddings() is missing or None); load the "
                "model class with the head (AutoModel with trust_remote_code for LLaDA/Dream, "
                "AutoModelForCausalLM for transformers architectures)"
            )
        if not isinstance(head, nn.Linear):
            raise UnsupportedModelError(
                f"model: {name}'s LM head is a {type(head).__name__}, not an nn.Linear applied to the "
                "hidden states (LLaDA with weight_tying applies its embedding matrix directly: load it "
                "with bgpo.models.LLaDAModelLM.from_pretrained)"
            )
        # Names, not modules: registering the head or the blocks again would duplicate state_dict keys.
        self._head_name = _module_name(model, head)
        self._blocks_name = _module_name(model, find_blocks(model))

        config = getattr(model, "config", None)
        family = str(getattr(config, "model_type", "")).lower()
        self.shift = family in _SHIFTED_FAMILIES if shift is None else shift
        self._four_d_mask = family in _SHIFTED_FAMILIES
        sources = (config, tokenizer)
        if mask_token_id is None:
            mask_token_id = next(
                (i for s in sources if (i := _first_id(getattr(s, "mask_token_id", None))) is not None), None
            )
        if mask_token_id is None:
            raise UnsupportedModelError(
                f"mask_token_id: {name}'s config has no mask_token_id and no tokenizer with one was given; "
                "pass mask_token_id= or tokenizer="
            )
        if eos_token_id is None:
            eos_token_id = next(
                (i for s in sources if (i := _first_id(getattr(s, "eos_token_id", None))) is not None), None
            )
        self.mask_token_id: int = int(mask_token_id)
        self.eos_token_id: int | None = eos_token_id

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        tokenizer: Any = None,
        mask_token_id: int | None = None,
        eos_token_id: int | None = None,
        shift: bool | None = None,
        **model_kwargs: Any,
    ) -> "HFMaskedDiffusionAdapter":
        """Load with ``trust_remote_code``: ``AutoModel`` when the checkpoint maps it to its own code
        (LLaDA, Dream, LLaDA-MoE), else ``AutoModelForCausalLM`` (transformers architectures).
        ``model_kwargs`` go to ``from_pretrained`` (``torch_dtype``, ``device_map``, ...)."""
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=True)
        auto = AutoModel if "AutoModel" in (getattr(config, "auto_map", None) or {}) else AutoModelForCausalLM
        model = auto.from_pretrained(name_or_path, config=config, trust_remote_code=True, **model_kwargs)
        return cls(model, tokenizer=tokenizer, mask_token_id=mask_token_id, eos_token_id=eos_token_id, shift=shift)

    # ------------------------------------------------------------------ protocol
    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_submodule(self._head_name).weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return self.model.get_submodule(self._head_name).bias

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self._blocks_name)

    #: ``bgpo.rollout.generate(cache="prefix")`` runs through the model's own cache, cut back to the prefix
    #: before each forward and checked once against the full forward (``bgpo.models.adapter_cache``).  The
    #: dual cache needs cached keys after the slice's, which an appending cache cannot hold.
    kv_cache_modes = ("prefix",)

    def new_kv_cache(self) -> HFPrefixCache:
        """An empty cache for one generation (``hidden_states(..., kv_cache=)``)."""
        return HFPrefixCache()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        kv_cache: HFPrefixCache | None = None,
        cache_start: int | None = None,
    ) -> torch.Tensor:
        """(B, T, H) hidden states, row t predicting token t; the LM head is never applied.

        ``kv_cache`` (sampling only, from ``new_kv_cache()``): without ``cache_start`` the forward runs
        the whole sequence and stores the model's cache; with ``cache_start=s`` the ``input_ids`` (B, n)
        are the tokens at positions s .. T-1 of the cached sequence (to its end: a prefix cache), they
        attend to the cached keys of positions 0 .. s-1 and to their own, and ``attention_mask`` is the
        whole sequence's (B, T)."""
        if cache_start is not None:
            if kv_cache is None:
                raise ValueError("cache_start: needs a kv_cache")
            if isinstance(cache_start, bool) or not isinstance(cache_start, int) or cache_start < 0:
                raise ValueError(f"cache_start: expected an int >= 0, got {cache_start!r}")
            return self._cached_forward(input_ids, attention_mask, kv_cache, cache_start)
        if kv_cache is None:
            return self._shifted(self._run(input_ids, attention_mask)[0])
        if not isinstance(kv_cache, HFPrefixCache):
            raise ValueError(f"kv_cache: expected the adapter's new_kv_cache(), got {type(kv_cache).__name__}")
        hidden, past = self._run(input_ids, attention_mask, use_cache=True)
        if past is None:
            raise UnsupportedModelError(
                f"model: {type(self.model).__name__} returned no cache from a forward with use_cache=True; "
                "sample with cache=None"
            )
        hidden = self._shifted(hidden)
        kv_cache.store(past, input_ids, None if self._cache_verified else hidden)
        return hidden

    _cache_verified = False  # set on the instance once the model's cache reproduced a full forward

    def _cached_forward(self, input_ids, attention_mask, kv_cache, start: int) -> torch.Tensor:
        if not isinstance(kv_cache, HFPrefixCache) or kv_cache.input_ids is None:
            raise ValueError("kv_cache: empty; run a forward with kv_cache and without cache_start first to fill it")
        cached_ids = kv_cache.input_ids
        batch, length = cached_ids.shape
        if input_ids.dim() != 2 or input_ids.shape[0] != batch or start + input_ids.shape[1] != length:
            raise ValueError(
                f"cache_start: the prefix cache runs positions {start} .. {length - 1} (to the end of the "
                f"cached {batch} x {length} sequence), got input_ids of shape {tuple(input_ids.shape)}; the "
                "dual cache needs bgpo.models.LLaDAModelLM"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask: expected shape {(batch, length)}, got {tuple(attention_mask.shape)}")
        # Shifted families read position t from the hidden state at t - 1: run from the token before.
        begin = start - 1 if self.shift else start
        if begin <= 0:  # no prefix to attend to: a full forward
            return self(torch.cat((cached_ids[:, :start], input_ids), dim=1), attention_mask)[:, start:]
        if not self._cache_verified:
            self._verify_cache(kv_cache, attention_mask, begin, start)
        ids = torch.cat((cached_ids[:, begin:start], input_ids), dim=1)
        hidden = self._run(ids, attention_mask, past=prefix_view(kv_cache.past, begin))[0]
        return hidden[:, :-1] if self.shift else hidden

    def _verify_cache(self, kv_cache: HFPrefixCache, attention_mask, begin: int, start: int) -> None:
        """Rerun the refresh's own tokens from ``begin`` against the cut cache (exact there) and compare."""
        probe = self._run(kv_cache.input_ids[:, begin:], attention_mask, past=prefix_view(kv_cache.past, begin))[0]
        probe = probe[:, :-1] if self.shift else probe
        reference = kv_cache.hidden[:, start:]
        error = relative_row_error(probe, reference)
        tolerance = VERIFY_TOLERANCE.get(reference.dtype, 5e-2)
        if not error <= tolerance:
            raise UnsupportedModelError(
                f"cache: {type(self.model).__name__}'s forward against its own cache differs from its full "
                f"forward by {error:.3g} (largest relative row error; {tolerance:g} allowed for "
                f"{reference.dtype}) where the cache is exact: its cache is not a bidirectional prefix cache "
                "(e.g. a causal bias with past keys; or dropout: call eval()); sample with cache=None"
            )
        self._cache_verified = True
        kv_cache.hidden = None

    def _run(self, input_ids, attention_mask, *, past=None, use_cache: bool = False):
        """The model's final hidden states (unshifted) for ``input_ids`` and the cache it returned.
        ``past``: the cache of the positions before ``input_ids``; ``attention_mask`` covers both."""
        if attention_mask is not None and self._four_d_mask:
            # Key padding as a (B, 1, queries, keys) boolean mask: every query sees exactly the real tokens.
            keys = attention_mask.bool()[:, None, None, :]
            attention_mask = keys.expand(-1, 1, input_ids.shape[1], -1)
        kwargs = {"use_cache": use_cache or past is not None}
        if past is not None:
            kwargs[cache_keyword(self.model)] = past
        parent_name, _, attr = self._head_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        head, recorder = getattr(parent, attr), _RecordInput()
        setattr(parent, attr, recorder)
        try:
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            setattr(parent, attr, head)
        if recorder.recorded is None:
            raise UnsupportedModelError(
                f"model: {type(self.model).__name__}'s forward never called its LM head module "
                f"{self._head_name!r}, so its hidden states cannot be intercepted"
            )
        return recorder.recorded, (returned_cache(output) if kwargs["use_cache"] else None)

    def _shifted(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat((hidden[:, :1], hidden[:, :-1]), dim=1) if self.shift else hidden

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **cache) -> torch.Tensor:
        """``cache``: ``kv_cache`` / ``cache_start`` as in ``forward``."""
        return self(input_ids, attention_mask, **cache)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(self(input_ids, attention_mask), self.lm_head_weight, self.lm_head_bias)
