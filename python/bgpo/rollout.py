"""Rollouts: LLaDA's semi-autoregressive block diffusion sampler, batched over prompts x responses.

The response (``gen_length`` tokens) starts fully masked and is split into blocks of
``block_length``, filled left to right; the ``steps`` are divided equally among the blocks.  Within a
block, step s unmasks ``k_s`` tokens: the block's masked count spread evenly over its steps, the
remainder going to the earliest steps (``divmod(block_length, steps_per_block)``).  At each step:

1. the model predicts every position from the current sequence (with classifier-free guidance,
   ``l = l_uncond + (cfg_scale + 1) * (l_cond - l_uncond)``, the unconditional pass seeing the prompt
   replaced by masks);
2. the prediction is ``argmax(l)`` at temperature 0, else the Gumbel-max sample LLaDA draws in float64,
   ``argmax(exp(l) / (-log u)^T)`` with ``u ~ U[0, 1)``.  We evaluate its logarithm,
   ``argmax(l - T * log(-log u))``: the same argmax (log is increasing), without ``exp`` overflowing
   for logits above ~709;
3. the confidence of a position is the probability of its prediction, ``softmax(l)[x0]`` in float64
   (``remasking="low_confidence"``), or uniform noise (``"random"``);
4. among the still-masked response positions up to the end of the current block, the ``k_s`` most
   confident are unmasked.

Which positions compete (step 4) is LLaDA's reference ``generate`` exactly: it scores every position,
gives those after the current block confidence -inf and those not masked -inf, so a position of an
earlier block that is still masked (the model predicted the mask token itself when it was chosen)
competes again with the current block's.  Here only the rows from the first still-masked response
position to the end of the block go through the LM head (normally just the block: the model still
sees the whole sequence), which saves a factor ``(prompt + gen_length) / block_length`` of LM-head
work and memory; positions after the block are never chosen in LLaDA either, because the candidates
always number at least ``k_s`` (the block's masked count is at least the sum of the remaining ``k``).
The one deliberate difference: the prompt is never modified (LLaDA's reference would also fill mask
tokens inside the prompt; bgpo's trainer pads prompts with the mask id when there is no EOS).  A
step with ``k_s = 0`` (more steps than tokens) changes nothing and is skipped without a forward pass.
At temperature 0 the tokens are therefore those of the reference (tests/test_rollout.py compares them
with a re-implementation of it).

Accelerated sampling (Fast-dLLM; approximate, opt-in):

* ``cache="prefix"``: the first forward of each block runs the whole sequence and stores every layer's
  keys and values (``model.new_kv_cache()``: ``bgpo.models.attention.KVCache`` for ``LLaDAModelLM``, the
  model's own cache for the Hugging Face adapter, see ``bgpo.models.adapter_cache``); the block's later
  steps run only the current block and everything after it, attending to the stored keys and values of the prompt and finished
  blocks.  ``cache="dual"`` runs only the current block, the suffix's keys and values being stored too.
  The cached keys and values are those of the sequence at the block's first step: exact for that
  step, stale afterwards (bidirectional attention: a prompt token's key depends on the response).
* ``threshold=p``: at each step every candidate whose confidence exceeds ``p`` is unmasked, and at
  least the most confident one of each row; a block then takes 1 .. block_length forwards.
* In these modes the candidates are the current block's positions not chosen yet (Fast-dLLM), so an
  earlier block's position is never reconsidered and a block always finishes.

Metrics (``GenerationOutput``): forward passes (each over the whole batch: also the forwards per
answer), response tokens per second, fraction of tokens unmasked in parallel (more than one per row
and step).

Batching: every row of the batch has the same schedule (all rows start a block with the whole block
masked), so a step is one forward pass and one ``topk`` for the whole batch, with no loop over rows.
"""
from __future__ import annotations

import itertools
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops._checks import check_real


__all__ = ["generate", "GenerationOutput", "transfer_schedule", "check_cache_offered", "REMASKING", "CACHES"]

REMASKING = ("low_confidence", "random")
CACHES = (None, "prefix", "dual")

# Rows of float64 logits processed at once when sampling: bounds the extra memory of the float64
# copy and its Gumbel noise to a few hundred MB whatever batch x block_length x vocabulary is.
_SAMPLING_CHUNK_ELEMENTS = 1 << 24


class GenerationOutput(NamedTuple):
    """``sequences`` (B, P + gen_length): prompts followed by responses.
    ``order`` (B, gen_length) if requested: the step (0 .. steps-1, counted over the whole response;
    with ``threshold``, the index of the forward pass) at which each response position was unmasked;
    -1 if it never was (the model predicted the mask token itself, which LLaDA's sampler also leaves
    in place).
    ``forwards``: model forward passes, each over the whole batch, so also the forwards per answer.
    ``tokens_per_second``: response tokens of the whole batch over the wall time of the call.
    ``parallel_fraction``: the fraction of response tokens unmasked at a step that unmasked more than
    one token of their row."""

    sequences: torch.Tensor
    order: torch.Tensor | None
    forwards: int = 0
    tokens_per_second: float = 0.0
    parallel_fraction: float = 0.0


def transfer_schedule(block_length: int, steps_per_block: int) -> list[int]:
    """Tokens to unmask at each step of a block: equal shares, the remainder to the earliest steps."""
    base, remainder = divmod(block_length, steps_per_block)
    return [base + (step < remainder) for step in range(steps_per_block)]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_cache_offered(name: str, model, cache: str | None) -> None:
    """``cache`` (None or one of CACHES) is among the ``kv_cache_modes`` the model offers; the error names
    ``name`` (the argument or config key that asked for it)."""
    if cache not in CACHES:
        raise ValueError(f"{name}: expected one of {CACHES}, got {cache!r}")
    modes = tuple(getattr(model, "kv_cache_modes", ()))
    if cache is not None and cache not in modes:
        raise ValueError(
            f"{name}: {type(model).__name__} offers {'the KV caches ' + repr(modes) if modes else 'no KV cache'}, "
            f"not {cache!r}; use one of those, None, or bgpo.models.LLaDAModelLM (prefix and dual; the Hugging "
            "Face adapter's dual cache needs a forward that takes position_ids)"
        )


def _generator(seed, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    if isinstance(seed, torch.Generator):
        if seed.device.type != device.type:
            raise ValueError(f"seed: generator is on {seed.device.type}, the prompts on {device.type}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected None, an int or a torch.Generator, got {type(seed).__name__}")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _block_logits(model, x, attention_mask, lo: int, hi: int, prompt_length: int, mask_id: int, cfg_scale: float,
                  cached=None):
    """fp32 logits (B, hi - lo, V) of columns lo .. hi-1, with classifier-free guidance if asked.

    ``cached``: None, or ``(cache, kv_cache, refresh)``: ``refresh`` runs the whole sequence and
    stores its keys and values; otherwise only columns lo .. end are run against the cache, with
    end = T for ``"prefix"`` (current block and suffix recomputed) and hi for ``"dual"``."""
    inputs, mask = x, attention_mask
    if cfg_scale > 0:
        unconditional = x.clone()
        unconditional[:, :prompt_length] = mask_id
        inputs = torch.cat((x, unconditional))
        mask = None if attention_mask is None else torch.cat((attention_mask, attention_mask))
    if cached is None:
        hidden = model.hidden_states(inputs, mask)[:, lo:hi]
    else:
        cache, kv_cache, refresh = cached
        if refresh:
            hidden = model.hidden_states(inputs, mask, kv_cache=kv_cache)[:, lo:hi]
        else:
            end = inputs.shape[1] if cache == "prefix" else hi
            hidden = model.hidden_states(inputs[:, lo:end], mask, kv_cache=kv_cache, cache_start=lo)[:, : hi - lo]
    logits = F.linear(hidden, model.lm_head_weight, model.lm_head_bias).float()
    if cfg_scale > 0:
        conditional, unconditional_logits = logits.chunk(2)
        logits = unconditional_logits + (cfg_scale + 1) * (conditional - unconditional_logits)
    return logits


def _choose(confidence: torch.Tensor, count: int | None, threshold: float | None) -> torch.Tensor:
    """(B, L) bool, the positions unmasked this step; non-candidates have confidence -inf.
    ``threshold`` None: the ``count`` most confident.  Else every candidate above the threshold,
    and the most confident one of each row that has a candidate (at least one per step)."""
    if threshold is None:
        chosen = torch.zeros_like(confidence, dtype=torch.bool)
        return chosen.scatter_(1, confidence.topk(count, dim=-1).indices, True)
    candidate = confidence > float("-inf")
    chosen = candidate & (confidence > threshold)
    return chosen.scatter_(1, confidence.argmax(dim=-1, keepdim=True), candidate.any(dim=-1, keepdim=True))


def _predict(logits: torch.Tensor, temperature: float, remasking: str, generator):
    """Predicted token (B, L) and its confidence (B, L) from logits (B, L, V), see the module docstring."""
    batch, length, vocab = logits.shape
    flat = logits.reshape(-1, vocab)
    tokens = torch.empty(flat.shape[0], dtype=torch.long, device=logits.device)
    confidence = torch.empty(flat.shape[0], dtype=torch.float64, device=logits.device)
    rows = max(1, _SAMPLING_CHUNK_ELEMENTS // vocab)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start : start + rows].to(torch.float64)
        scores = chunk
        if temperature > 0:
            u = torch.rand(chunk.shape, dtype=torch.float64, device=chunk.device, generator=generator)
            scores = chunk - temperature * torch.log(-torch.log(u))
        chosen = scores.argmax(dim=-1)
        tokens[start : start + rows] = chosen
        if remasking == "low_confidence":
            chosen_logit = chunk.gather(-1, chosen[:, None]).squeeze(-1)
            confidence[start : start + rows] = torch.exp(chosen_logit - chunk.logsumexp(dim=-1))
    if remasking == "random":
        confidence = torch.rand(flat.shape[0], dtype=torch.float64, device=logits.device, generator=generator)
    return tokens.view(batch, length), confidence.view(batch, length)


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    eos_id: int | None = None,
    suppress_eos: bool = False,
    seed: int | torch.Generator | None = None,
    group_size: int = 1,
    return_order: bool = False,
    cache: str | None = None,
    threshold: float | None = None,
) -> GenerationOutput:
    """Sample responses with LLaDA's block diffusion sampler.

    Args:
        model: a ``bgpo.models.MaskedDiffusionLM`` (its train/eval mode is left as is: call ``eval()``
            if it has dropout).
        prompt_ids: (B, P) token ids; batched prompts of different lengths are left-padded.
        attention_mask: (B, P), nonzero for real prompt tokens (zero on the left padding).
        gen_length, block_length, steps: response length, block size, total diffusion steps;
            ``gen_length`` must be a multiple of ``block_length``, ``steps`` of the number of blocks.
        temperature: 0 for greedy (deterministic), else Gumbel-max sampling at that temperature.
        remasking: ``"low_confidence"`` or ``"random"``.
        cfg_scale: classifier-free guidance scale (0 = off; doubles the batch of each forward).
        mask_id, eos_id: default to ``model.mask_token_id`` / ``model.eos_token_id``.
        suppress_eos: set the EOS logit to -inf (no EOS is ever generated).
        seed: an int, a ``torch.Generator`` on the prompts' device, or None for torch's global RNG.
        group_size: G responses per prompt; rows ``b*G .. b*G + G-1`` of the output answer prompt b.
        return_order: also return the step at which each response position was unmasked.
        cache: None (exact), ``"prefix"`` or ``"dual"``: Fast-dLLM's approximate KV cache, see
            "Accelerated sampling" above; needs a model whose ``kv_cache_modes`` include it
            (``LLaDAModelLM``: both; ``HFMaskedDiffusionAdapter``: ``"prefix"``, and ``"dual"`` when the
            model's forward takes ``position_ids``).
        threshold: None (the step schedule), or unmask every position of the block whose
            confidence exceeds it, at least one per row and step (``steps`` then only validates).

    Returns:
        ``GenerationOutput(sequences, order)``; ``order`` is None unless ``return_order``.
    """
    if not hasattr(model, "hidden_states") or not hasattr(model, "lm_head_weight"):
        raise ValueError(
            f"model: {type(model).__name__} is not a MaskedDiffusionLM (needs hidden_states() and "
            "lm_head_weight); wrap Hugging Face models in bgpo.models.HFMaskedDiffusionAdapter"
        )
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.dtype.is_floating_point:
        raise ValueError("prompt_ids: expected a 2-D (batch, prompt length) tensor of token ids")
    if attention_mask is not None and attention_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"attention_mask: expected shape {tuple(prompt_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps),
                        ("group_size", group_size)):
        _check_positive_int(name, value)
    if gen_length % block_length:
        raise ValueError(f"gen_length: {gen_length} is not a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps: {steps} is not a multiple of the number of blocks (gen_length/block_length = {num_blocks})"
        )
    check_real("temperature", temperature, nonnegative=True)
    check_real("cfg_scale", cfg_scale, nonnegative=True)
    if remasking not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {remasking!r}")
    check_cache_offered("cache", model, cache)
    check_real("threshold", threshold, interval=(0, 1), optional=True)  # a probability
    if threshold is not None and remasking != "low_confidence":
        raise ValueError(f"threshold: compares low_confidence probabilities; remasking={remasking!r} has none")
    mask_id = model.mask_token_id if mask_id is None else mask_id
    eos_id = model.eos_token_id if eos_id is None else eos_id
    if suppress_eos and eos_id is None:
        raise ValueError("eos_id: suppress_eos=True needs an EOS id and the model has none; pass eos_id=")

    device = prompt_ids.device
    prompt_ids = prompt_ids.long()
    generator = _generator(seed, device)
    if group_size > 1:
        prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(group_size, dim=0)
    batch, prompt_length = prompt_ids.shape
    x = torch.cat((prompt_ids, prompt_ids.new_full((batch, gen_length), mask_id)), dim=1)
    if attention_mask is not None:
        response_visible = torch.ones(batch, gen_length, dtype=torch.bool, device=device)
        attention_mask = torch.cat((attention_mask.to(device=device, dtype=torch.bool), response_visible), dim=1)
    order = torch.full((batch, gen_length), -1, dtype=torch.long, device=device) if return_order else None

    schedule = transfer_schedule(block_length, steps // num_blocks)
    exact = cache is None and threshold is None
    kv_cache = None if cache is None else model.new_kv_cache()
    began = time.perf_counter()
    forwards = parallel = step = 0
    for block in range(num_blocks):
        lo = prompt_length + block * block_length
        hi = lo + block_length
        pending = None if exact else torch.ones(batch, block_length, dtype=torch.bool, device=device)
        refresh = True  # the first forward of a block refreshes the KV cache
        for count in (schedule if threshold is None else itertools.repeat(None)):
            if threshold is not None and not pending.any():
                break
            if count == 0:
                step += 1
                continue
            if exact:  # LLaDA: still-masked positions of earlier blocks compete too
                first = int((x[:, prompt_length:hi] == mask_id).any(dim=0).nonzero()[0])
                start = min(lo, prompt_length + first)
                candidates = x[:, start:hi] == mask_id
            else:
                start, candidates = lo, pending
            cached = None if cache is None else (cache, kv_cache, refresh)
            logits = _block_logits(model, x, attention_mask, start, hi, prompt_length, mask_id, cfg_scale, cached)
            refresh = False
            forwards += 1
            if suppress_eos:
                logits[..., eos_id] = float("-inf")
            tokens, confidence = _predict(logits, temperature, remasking, generator)
            chosen = _choose(confidence.masked_fill(~candidates, float("-inf")), count, threshold)
            x[:, start:hi] = torch.where(chosen, tokens, x[:, start:hi])
            if pending is not None:
                pending &= ~chosen
            per_row = chosen.sum(dim=-1)
            parallel = parallel + per_row[per_row > 1].sum()  # on the device: read once, at the end
            if order is not None:
                # a chosen position whose prediction was the mask token itself stays masked: not unmasked
                order[:, start - prompt_length : hi - prompt_length].masked_fill_(chosen & (tokens != mask_id), step)
            step += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    return GenerationOutput(x, order, forwards, batch * gen_length / seconds,
                            int(parallel) / (batch * gen_length))
