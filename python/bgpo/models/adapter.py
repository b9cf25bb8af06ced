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

from .adapter_cache import (VERIFY_TOLERANCE, HFKVCache, cache_keyword, relative_row_error, returned_cache,
                            takes_position_ids)
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

    @property
    def kv_cache_modes(self) -> tuple[str, ...]:
        """The caches ``bgpo.rollout.generate(cache=...)`` may use, through the model's own cache
        (``bgpo.models.adapter_cache``): ``"prefix"`` always, ``"dual"`` when the forward takes
        ``position_ids``.  Each is checked once against the full forward on first use."""
        return ("prefix", "dual") if takes_position_ids(self.model) else ("prefix",)

    def new_kv_cache(self) -> HFKVCache:
        """An empty cache for one generation (``hidden_states(..., kv_cache=)``)."""
        return HFKVCache()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        kv_cache: HFKVCache | None = None,
        cache_start: int | None = None,
    ) -> torch.Tensor:
        """(B, T, H) hidden states, row t predicting token t; the LM head is never applied.

        ``kv_cache`` (sampling only, from ``new_kv_cache()``): without ``cache_start`` the forward runs
        the whole sequence and stores the model's cache; with ``cache_start=s`` the ``input_ids`` (B, n)
        are the tokens at positions s .. s+n-1 of the cached sequence, they attend to the cached keys of
        the other positions and to their own, and ``attention_mask`` is the whole sequence's (B, T).
        Ending at T is the prefix cache, before it the dual cache (see ``kv_cache_modes``)."""
        if cache_start is not None:
            if kv_cache is None:
                raise ValueError("cache_start: needs a kv_cache")
            if isinstance(cache_start, bool) or not isinstance(cache_start, int) or cache_start < 0:
                raise ValueError(f"cache_start: expected an int >= 0, got {cache_start!r}")
            return self._cached_forward(input_ids, attention_mask, kv_cache, cache_start)
        if kv_cache is None:
            return self._shifted(self._run(input_ids, attention_mask)[0])
        if not isinstance(kv_cache, HFKVCache):
            raise ValueError(f"kv_cache: expected the adapter's new_kv_cache(), got {type(kv_cache).__name__}")
        hidden, past = self._run(input_ids, attention_mask, use_cache=True)
        if past is None:
            raise UnsupportedModelError(
                f"model: {type(self.model).__name__} returned no cache from a forward with use_cache=True; "
                "sample with cache=None"
            )
        kv_cache.store(past, input_ids)
        return self._shifted(hidden)

    # The caches whose forward reproduced the full forward (set on the instance by _verify_cache).
    _verified_caches: frozenset = frozenset()

    def _cached_forward(self, input_ids, attention_mask, kv_cache, start: int) -> torch.Tensor:
        if not isinstance(kv_cache, HFKVCache) or kv_cache.input_ids is None:
            raise ValueError("kv_cache: empty; run a forward with kv_cache and without cache_start first to fill it")
        cached_ids = kv_cache.input_ids
        batch, length = cached_ids.shape
        end = start + (input_ids.shape[1] if input_ids.dim() == 2 else 0)
        if input_ids.dim() != 2 or input_ids.shape[0] != batch or not start < end <= length:
            raise ValueError(
                f"cache_start: input_ids of shape {tuple(input_ids.shape)} from position {start} do not fit the "
                f"cached {batch} x {length} sequence"
            )
        mode = "prefix" if end == length else "dual"
        if mode not in self.kv_cache_modes:
            raise ValueError(
                f"cache_start: positions {start} .. {end - 1} of {length} need the dual cache, and "
                f"{type(self.model).__name__}'s forward takes no position_ids; the prefix cache runs to the end"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask: expected shape {(batch, length)}, got {tuple(attention_mask.shape)}")
        # Shifted families read position t from the hidden state at t - 1: run from the token before.
        begin = start - 1 if self.shift else start
        if begin <= 0:  # no prefix to attend to: a full forward of the refresh's prefix and the slice
            whole = torch.cat((cached_ids[:, :start], input_ids, cached_ids[:, end:]), dim=1)
            return self(whole, attention_mask)[:, start:end]
        if mode not in self._verified_caches:
            self._verify_cache(kv_cache, attention_mask, begin, start, end, mode)
        hidden = self._against_cache(torch.cat((cached_ids[:, begin:start], input_ids), dim=1), attention_mask,
                                     kv_cache, begin, end)
        return hidden[:, :-1] if self.shift else hidden

    def _against_cache(self, ids, attention_mask, kv_cache: HFKVCache, begin: int, end: int) -> torch.Tensor:
        """Hidden states (unshifted) of the tokens ``ids`` at positions begin .. end-1, against the cache."""
        length = kv_cache.input_ids.shape[1]
        if end == length:  # prefix: the cache cut back to 0 .. begin-1, the slice continues at begin
            return self._run(ids, attention_mask, past=kv_cache.refresh_keys(begin))[0]
        # dual: all T cached positions, their stale copies of begin .. end-1 hidden, the fresh ones appended
        batch = ids.shape[0]
        keys = (torch.ones(batch, length, dtype=torch.long, device=ids.device) if attention_mask is None
                else attention_mask.clone())
        fresh = keys[:, begin:end].clone()
        keys[:, begin:end] = 0
        positions = torch.arange(begin, end, device=ids.device).expand(batch, -1)
        return self._run(ids, torch.cat((keys, fresh), dim=1), past=kv_cache.refresh_keys(length),
                         position_ids=positions)[0]

    def _verify_cache(self, kv_cache: HFKVCache, attention_mask, begin: int, start: int, end: int, mode: str):
        """Rerun the refresh's own tokens begin .. end-1 against the cache (exact there) and compare with a
        full forward of the refresh's sequence (once per cache and adapter: two forwards more)."""
        probe = self._against_cache(kv_cache.input_ids[:, begin:end], attention_mask, kv_cache, begin, end)
        probe = probe[:, :-1] if self.shift else probe
        reference = self._shifted(self._run(kv_cache.input_ids, attention_mask)[0])[:, start:end]
        error = relative_row_error(probe, reference)
        tolerance = VERIFY_TOLERANCE.get(reference.dtype, 5e-2)
        if not error <= tolerance:
            raise UnsupportedModelError(
                f"cache: {type(self.model).__name__}'s forward against its own cache ({mode}) differs from its "
                f"full forward by {error:.3g} (largest relative row error; {tolerance:g} allowed for "
                f"{reference.dtype}) where the cache is exact: it cannot serve as a bidirectional {mode} cache "
                "(e.g. a causal bias with past keys, attention masks or position_ids ignored; or dropout: call "
                "eval()); sample with cache=None"
            )
        self._verified_caches = self._verified_caches | {mode}

    def _run(self, input_ids, attention_mask, *, past=None, use_cache: bool = False, position_ids=None):
        """The model's final hidden states (unshifted) for ``input_ids`` and the cache it returned.
        ``past``: the cache of the other positions; ``attention_mask`` covers the cached keys, then the new."""
        if attention_mask is not None and self._four_d_mask:
            # Key padding as a (B, 1, queries, keys) boolean mask: every query sees exactly the real tokens.
            keys = attention_mask.bool()[:, None, None, :]
            attention_mask = keys.expand(-1, 1, input_ids.shape[1], -1)
        kwargs = {"use_cache": use_cache or past is not None}
        if past is not None:
            kwargs[cache_keyword(self.model)] = past
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
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
