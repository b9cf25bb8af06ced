"""Turning sampled sequences into scored responses: the response of each row (up to and including its
first EOS), its decoded text, and its reward, computed in the sandbox for code."""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from ..rewards import code_reward, get_reward
from ..rewards.sandbox import require_sandbox

__all__ = ["code_reward_checked", "split_responses", "score_completions"]


def code_reward_checked(config):
    """The code reward once the sandbox is known to work (a RuntimeError saying what to install if not,
    unless ``allow_unsandboxed_code``); None for the other rewards."""
    if (config.reward or config.data.task) != "code":
        return None
    if require_sandbox(config.allow_unsandboxed_code):
        return get_reward("code")
    warnings.warn("allow_unsandboxed_code: the code sandbox does not work here; model-written code runs as this "
                  "user, without isolation", RuntimeWarning, stacklevel=2)
    return lambda completion, example: code_reward(completion, example, allow_unsandboxed=True)


def split_responses(sequences: torch.Tensor, prompt_length: int, prompt_attention: torch.Tensor,
                    group_size: int, eos_id: int | None, tokenizer) -> dict:
    """The responses of ``sequences`` (prompt of ``prompt_length`` tokens, then the response): the mask of
    each response's tokens up to and including its first EOS, the decoded completions, and the attention
    mask of the whole sequences (zero on the prompts' padding and after each response's first EOS; None
    when nothing is padded)."""
    responses = sequences[:, prompt_length:]
    if eos_id is None:
        response_mask = torch.ones_like(responses, dtype=torch.bool)
    else:
        is_eos = (responses == eos_id).long()
        response_mask = (is_eos.cumsum(dim=1) - is_eos) == 0  # up to and including the first EOS
    completions = [tokenizer.decode(row[keep].tolist(), skip_special_tokens=True)
                   for row, keep in zip(responses.cpu(), response_mask.cpu())]
    # The tokens after a response's first EOS are padding: hidden from attention (as the TRL integration's
    # completion mask hides them), so that packing (policy.pack_sequences) drops them with the same gradient.
    full_attention = torch.cat([prompt_attention.repeat_interleave(group_size, dim=0),
                                response_mask.cpu().long()], dim=1).to(sequences.device)
    return dict(response_mask=response_mask, completions=completions,
                attention_mask=None if bool(full_attention.all()) else full_attention)


def score_completions(reward_fn, completions: list[str], examples: list[dict], *,
                      parallel: bool) -> tuple[torch.Tensor, list[str]]:
    """Rewards (N,) and reasons; completion k answers ``examples[k // (N / len(examples))]``.  ``parallel``
    scores in a thread pool (the code reward's work is in sandboxed subprocesses)."""
    group = len(completions) // len(examples)
    pairs = [(c, examples[k // group]) for k, c in enumerate(completions)]
    if parallel:
        with ThreadPoolExecutor(max_workers=min(8, len(pairs))) as pool:
            outputs = list(pool.map(lambda pair: reward_fn(*pair), pairs))
    else:
        outputs = [reward_fn(c, e) for c, e in pairs]
    return torch.tensor([o.score for o in outputs], dtype=torch.float32), [o.reason for o in outputs]
