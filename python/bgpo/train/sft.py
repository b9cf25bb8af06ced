"""Masked-diffusion supervised warm-up: teach a model the answer format before RL (LLaDA's SFT loss).

For a prompt x and a target response y (the example's ``answer`` followed by EOS padding up to the
response length, which LLaDA's SFT also trains on), draw t ~ U(t_min, 1], mask each response token
with probability t, and minimise ``-(1/t) Σ_{masked} log p(y_i | y_t, x) / L``: one MC sample of the
ELBO per example (``random_mask``, ``scheme="bernoulli"``) through ``fused_elbo`` (no logits are
materialised).  AdamW, linear warm-up then cosine decay to 10 % of the learning rate.  With
``pack_sequences`` the real tokens of the batch are forwarded packed in one row (``bgpo.packing``): the
prompts' left padding costs no compute, and the loss and gradient are the padded forward's.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..ops.fused_elbo_loss import fused_elbo
from ..ops.random_mask import random_mask
from ..packing import keep_mask, pack
from .config import SFTConfig
from .distributed import DistributedContext, all_reduce_gradients
from .seeds import derive_seed

__all__ = ["supervised_warmup"]


def supervised_warmup(
    model,
    parameters: list[torch.nn.Parameter],
    config: SFTConfig,
    *,
    encode: Callable[[list[dict]], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]],
    examples: list[dict],
    seed: int,
    context: DistributedContext,
    device: torch.device,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    pack_sequences: bool = False,
) -> list[float]:
    """Run ``config.steps`` warm-up steps; return the loss of each (fewer when ``should_stop()``, asked
    after every step, says to stop).

    ``encode(examples)`` gives ``(prompt_ids (B, P), prompt attention mask or None, targets (B, L))``.
    Each rank trains on its share of every step's ``config.batch_size`` examples.  ``pack_sequences``: forward
    packed (the model must take ``cu_seqlens``, see ``bgpo.packing.supports_packing``).
    """
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    local = config.batch_size // context.world_size
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(config.steps), desc="warm-up", disable=not (progress and context.is_main), dynamic_ncols=True)
    for step in bar:
        scale = min(1.0, (step + 1) / max(1, config.warmup_steps))
        progress_after = max(0, step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_after))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * scale
        chosen = torch.randint(len(examples), (config.batch_size,), generator=generator)
        rows = chosen[context.rank * local : (context.rank + 1) * local].tolist()
        prompt, prompt_mask, targets = encode([examples[i] for i in rows])
        prompt, targets = prompt.to(device), targets.to(device)
        P = prompt.shape[1]
        input_ids = torch.cat([prompt, targets], dim=1)
        attention = None if prompt_mask is None else torch.cat(
            [prompt_mask.to(device), torch.ones_like(targets)], dim=1)
        maskable = torch.zeros_like(input_ids, dtype=torch.bool)
        maskable[:, P:] = True
        sequence_ids = torch.arange(len(rows), device=device) + context.rank * local
        sample = random_mask(input_ids, maskable, mask_id=model.mask_token_id, seed=derive_seed(seed, step),
                             sample_index=0, num_samples=1, sequence_ids=sequence_ids, scheme="bernoulli")
        if pack_sequences:  # the same masks, gathered at the real tokens
            packing = pack(keep_mask(input_ids, attention))
            hidden = model.hidden_states(packing.gather(sample.noisy_ids).unsqueeze(0), **packing.model_inputs())[0]
            elbo = fused_elbo(hidden, model.lm_head_weight, packing.gather(input_ids), packing.gather(sample.masked),
                              sample.elbo_weight, bias=model.lm_head_bias, cu_seqlens=packing.cu_seqlens)
        else:
            hidden = model.hidden_states(sample.noisy_ids, attention)[:, P:]
            elbo = fused_elbo(hidden, model.lm_head_weight, targets, sample.masked[:, P:], sample.elbo_weight,
                              bias=model.lm_head_bias)
        loss = -(elbo / targets.shape[1]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(model, context)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if should_stop is not None and should_stop():
            break
    bar.close()
    return losses
