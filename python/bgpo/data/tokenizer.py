"""Tokenizers the trainer drives: a Hugging Face tokenizer, or ``CharTokenizer`` for CPU demos.

No tokenizer can be downloaded on a machine without a hub, so the demos use a character-level
tokenizer whose ids fit bgpo's ``tiny`` model preset: a printable ASCII character is its own code
point (32..125), EOS (also the padding) is 126 and the mask token 127, like LLaDA whose padding is
its EOS.  ``encode_prompts`` renders prompts through the tokenizer's chat template when it has one.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["CharTokenizer", "load_tokenizer", "render_prompt", "tokenize", "encode_prompts", "encode_responses",
           "tokenizer_vocab_size", "check_tokenizer_matches"]


class CharTokenizer:
    """One token per printable ASCII character (ids 32..125); EOS/pad 126, mask 127; no chat template."""

    eos_token_id = 126
    pad_token_id = 126
    mask_token_id = 127
    vocab_size = 128
    chat_template = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a character outside 32..125 (other than a newline, read as a space) is an error."""
        ids = []
        for char in text.replace("\n", " "):
            code = ord(char)
            if not 32 <= code <= 125:
                raise ValueError(f"text: character {char!r} is outside CharTokenizer's alphabet (ASCII 32..125)")
            ids.append(code)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; EOS and mask tokens are dropped (``skip_special_tokens``) or shown as ``|``/``_``."""
        special = {self.eos_token_id: "|", self.mask_token_id: "_"}
        out = []
        for i in ids:
            i = int(i)
            if i in special:
                if not skip_special_tokens:
                    out.append(special[i])
            else:
                out.append(chr(i))
        return "".join(out)


def load_tokenizer(name: str, *, trust_remote_code: bool = True):
    """``"char"`` for ``CharTokenizer``, else a Hugging Face tokenizer name or directory."""
    if name == "char":
        return CharTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def tokenizer_vocab_size(tokenizer) -> int:
    """Number of ids the tokenizer can produce: ``len(tokenizer)`` (added tokens included), else ``vocab_size``."""
    return len(tokenizer) if hasattr(tokenizer, "__len__") else int(tokenizer.vocab_size)


def check_tokenizer_matches(tokenizer, model) -> None:
    """ValueError listing every way ``tokenizer`` and ``model`` disagree, before any work is done.

    A mismatch is silent otherwise: prompts index the wrong rows, responses never decode to what the
    reward reads, and every reward comes out 0.  Checked: the tokenizer's ids fit the model's embedding
    (``lm_head_weight`` rows); the tokenizer's ``mask_token_id``, if it has one, is the model's; the
    model's mask and EOS ids are ids of the tokenizer; the model's EOS is the tokenizer's EOS or one of its
    special tokens (the completions are decoded without special tokens, so any other EOS would be read
    by the reward as text).
    """
    vocab, rows = tokenizer_vocab_size(tokenizer), int(model.lm_head_weight.shape[0])
    mask_id, eos_id = model.mask_token_id, model.eos_token_id
    problems = []
    if vocab > rows:
        problems.append(f"the tokenizer has {vocab} ids but the model's embedding only {rows} rows")
    tokenizer_mask = getattr(tokenizer, "mask_token_id", None)
    if tokenizer_mask is not None and tokenizer_mask != mask_id:
        problems.append(f"mask token: the tokenizer's is {tokenizer_mask}, the model's {mask_id}")
    for name, value in (("mask", mask_id), ("EOS", eos_id)):
        if value is not None and not 0 <= value < vocab:
            problems.append(f"the model's {name} id {value} is not an id of the tokenizer (0..{vocab - 1})")
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ()) | {getattr(tokenizer, "pad_token_id", None)}
    special |= {i for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                if getattr(token, "special", False)}  # added special tokens, which decoding also skips
    if eos_id is not None and tokenizer_eos is not None and eos_id != tokenizer_eos and eos_id not in special:
        problems.append(f"EOS: the tokenizer's is {tokenizer_eos}, the model's {eos_id} (not a special token of "
                        "the tokenizer, so decoding would keep it in the completions)")
    if problems:
        raise ValueError("model.tokenizer: the tokenizer does not match the model: " + "; ".join(problems)
                         + " (set model.tokenizer to the model's own tokenizer)")


def render_prompt(tokenizer, text: str, *, use_chat_template: bool = True) -> str:
    """``text`` as a user turn of the tokenizer's chat template (with the assistant header), if it has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_responses(tokenizer, texts: Sequence[str], *, length: int, eos_id: int) -> torch.Tensor:
    """(B, length) response ids: each text's tokens, then EOS up to ``length`` (truncated if longer)."""
    out = torch.full((len(texts), length), eos_id, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = tokenize(tokenizer, text)[:length]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def encode_prompts(
    tokenizer, texts: Sequence[str], *, pad_id: int, length: int | None = None, use_chat_template: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids (B, P) and attention mask (B, P); ``length`` pads to a fixed P (>= the longest).

    A chat template already contains the special tokens it needs, so none are added on top of it.
    """
    encoded = [tokenize(tokenizer, render_prompt(tokenizer, text, use_chat_template=use_chat_template))
               for text in texts]
    longest = max(len(ids) for ids in encoded)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length: {length} is shorter than the longest prompt ({longest} tokens)")
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        if tokens:
            ids[row, length - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
            mask[row, length - len(tokens):] = 1
    return ids, mask
