"""Tokenizers the trainer drives: a Hugging Face tokenizer, or ``CharTokenizer`` for CPU demos.

No tokenizer can be downloaded on a machine without a hub, so the demos use a character-level
tokenizer whose ids fit bgpo's ``tiny`` model preset: a printable ASCII character is its own code
point (32..125), EOS (also the padding) is 126 and the mask token 127, like LLaDA whose padding is
its EOS.  ``encode_prompts`` renders prompts through the tokenizer's chat template when it has one.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["CharTokenizer", "load_tokenizer", "render_prompt", "tokenize", "encode_prompts", "encode_responses"]


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
