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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) hidden states, row t predicting token t; the LM head is never applied."""
        if attention_mask is not None and self._four_d_mask:
            # Key padding as a (B, 1, T, T) boolean mask: every query sees exactly the real tokens.
            keys = attention_mask.bool()[:, None, None, :]
            attention_mask = keys.expand(-1, 1, input_ids.shape[1], -1)
        parent_name, _, attr = self._head_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        head, recorder = getattr(parent, attr), _RecordInput()
        setattr(parent, attr, recorder)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            setattr(parent, attr, head)
        hidden = recorder.recorded
        if hidden is None:
            raise UnsupportedModelError(
                f"model: {type(self.model).__name__}'s forward never called its LM head module "
                f"{self._head_name!r}, so its hidden states cannot be intercepted"
            )
        if self.shift:
            hidden = torch.cat((hidden[:, :1], hidden[:, :-1]), dim=1)
        return hidden

    #: ``generate(cache=...)`` is refused: the Hugging Face models' own caches (LLaDA's remote code, Dream)
    #: append new keys after the cached ones with shifted positions, an autoregressive cache; running a
    #: bidirectional slice against the whole cached sequence needs ``bgpo.models.LLaDAModelLM``.
    supports_kv_cache = False

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self(input_ids, attention_mask)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(self(input_ids, attention_mask), self.lm_head_weight, self.lm_head_bias)
