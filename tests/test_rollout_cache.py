"""bgpo.rollout.generate's accelerated modes: Fast-dLLM's KV cache, threshold decoding, metrics, diversity.

What the cache makes exact and what approximate: a cached position j reuses the keys and values of
the block's first forward.  At layer 0 they are a function of token j and its position only, and a
cached token does not change while it is cached (``"prefix"``: prompt and finished blocks; ``"dual"``
also the later blocks, still all masks) -- so with ONE layer both caches reproduce the exact sampler
token for token, whatever the blocks.  From layer 1 on, keys and values depend on the whole sequence
through bidirectional attention: with ``block_length = gen_length`` and ``"prefix"`` the prompt's keys
and values are those of the prompt followed by an all-mask response, stale as soon as a response
token is unmasked.  The first step of every block is exact (it is a full forward).
"""
from __future__ import annotations

import types

import pytest
import torch

from bgpo.models import LLaDAConfig, LLaDAModelLM
from bgpo.models.attention import KVCache
from bgpo.rollout import generate


def _llada(layers: int = 2, seed: int = 0) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(LLaDAConfig.preset("tiny", n_layers=layers)).double().eval()


def _padded_prompts():
    torch.manual_seed(1)
    prompt = torch.randint(0, 120, (3, 6))
    prompt[0, :3] = 126
    attention = torch.ones_like(prompt)
    attention[0, :3] = 0
    return prompt, attention


def test_cached_slice_forward_equals_full_forward_on_a_fresh_cache():
    model = _llada()
    prompt, attention = _padded_prompts()
    x = torch.cat((prompt, torch.randint(0, 120, (3, 8))), dim=1)
    mask = torch.cat((attention, torch.ones(3, 8, dtype=attention.dtype)), dim=1)
    cache = KVCache()
    full = model(x, mask, kv_cache=cache)
    for lo, hi in ((6, 14), (8, 10)):
        part = model(x[:, lo:hi], mask, kv_cache=cache, cache_start=lo)
        torch.testing.assert_close(part, full[:, lo:hi], rtol=0, atol=1e-12)


@pytest.mark.parametrize("layers, exact", [(1, True), (2, False)])
def test_cache_is_exact_at_layer_zero_and_stale_after(layers, exact):
    # Fill the cache with an all-mask response, unmask three response tokens, rerun only the response.
    model = _llada(layers)
    prompt, attention = _padded_prompts()
    x = torch.cat((prompt, torch.full((3, 8), model.mask_token_id)), dim=1)
    mask = torch.cat((attention, torch.ones(3, 8, dtype=attention.dtype)), dim=1)
    cache = KVCache()
    model(x, mask, kv_cache=cache)
    x[:, 7:10] = torch.randint(0, 120, (3, 3))
    cached = model(x[:, 6:], mask, kv_cache=cache, cache_start=6)
    full = model(x, mask)[:, 6:]
    gap = (cached - full).abs().max().item()
    assert gap < 1e-12 if exact else gap > 1e-6


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("block_length", [8, 4])
def test_one_layer_model_cache_reproduces_the_exact_sampler(cache, block_length):
    model = _llada(layers=1)
    prompt, attention = _padded_prompts()
    kwargs = dict(attention_mask=attention, gen_length=8, block_length=block_length, steps=8, return_order=True)
    exact = generate(model, prompt, **kwargs)
    cached = generate(model, prompt, cache=cache, **kwargs)
    assert torch.equal(cached.sequences, exact.sequences) and torch.equal(cached.order, exact.order)


def test_prefix_cache_single_block_first_step_exact_later_steps_approximate():
    model = _llada(layers=2)
    prompt, attention = _padded_prompts()
    kwargs = dict(attention_mask=attention, gen_length=8, block_length=8, steps=8, return_order=True)
    exact = generate(model, prompt, **kwargs)
    cached = generate(model, prompt, cache="prefix", **kwargs)
    first = exact.order == 0  # the first step is a full forward: same position, same token
    assert torch.equal(cached.order == 0, first)
    assert torch.equal(cached.sequences[:, 6:][first], exact.sequences[:, 6:][first])
    assert cached.forwards == exact.forwards == 8


@pytest.mark.parametrize("cache, threshold", [("dual", None), ("prefix", 0.3), (None, 0.3), ("dual", 0.3)])
def test_left_padded_batch_matches_unpadded_prompts_with_cache(cache, threshold):
    model = _llada()
    prompt, attention = _padded_prompts()
    kwargs = dict(gen_length=8, block_length=4, steps=8, cache=cache, threshold=threshold, return_order=True)
    padded = generate(model, prompt, attention_mask=attention, **kwargs)
    alone = generate(model, prompt[:1, 3:], **kwargs)
    assert torch.equal(padded.sequences[0, 6:], alone.sequences[0, 3:])
    if threshold is None:  # with a threshold the step index depends on the batch's other rows
        assert torch.equal(padded.order[0], alone.order[0])
    assert torch.equal(padded.sequences[:, :6], prompt)


def test_threshold_one_token_at_least_never_beyond_the_block():
    model = _llada()
    prompt, attention = _padded_prompts()
    kwargs = dict(attention_mask=attention, gen_length=8, block_length=4, steps=2, return_order=True)
    # Nothing exceeds 1: exactly one token per row and step, whatever `steps` says.
    slow = generate(model, prompt, threshold=1.0, **kwargs)
    assert slow.forwards == 8 and slow.parallel_fraction == 0.0
    assert all(sorted(row) == list(range(8)) for row in slow.order.tolist())
    # Everything exceeds 0: each block in one forward.
    fast = generate(model, prompt, threshold=0.0, cache="dual", **kwargs)
    assert fast.forwards == 2 and fast.parallel_fraction == 1.0
    assert fast.order.tolist() == [[0] * 4 + [1] * 4] * 3
    middle = generate(model, prompt, threshold=0.05, temperature=1.0, seed=0, **kwargs)
    assert (middle.order >= 0).all() and 2 <= middle.forwards <= 8
    assert (middle.order[:, :4].max(dim=1).values < middle.order[:, 4:].min(dim=1).values).all()


def test_exact_sampler_metrics():
    model = _llada()
    prompt, attention = _padded_prompts()
    out = generate(model, prompt, attention_mask=attention, gen_length=8, block_length=4, steps=4)
    assert out.forwards == 4 and out.parallel_fraction == 1.0 and out.tokens_per_second > 0
    out = generate(model, prompt, attention_mask=attention, gen_length=8, block_length=4, steps=8)
    assert out.forwards == 8 and out.parallel_fraction == 0.0


def _duplicate_fraction(sequences: torch.Tensor, group_size: int) -> float:
    """Mean over groups of 1 - (distinct responses / G)."""
    groups = sequences.view(-1, group_size, sequences.shape[1])
    return sum(1 - len({tuple(r.tolist()) for r in g}) / group_size for g in groups) / groups.shape[0]


@pytest.mark.parametrize("cache, threshold", [(None, None), ("dual", None), ("dual", 0.9), ("prefix", 0.5)])
def test_groups_are_diverse_at_positive_temperature(cache, threshold):
    model = _llada()
    prompt, attention = _padded_prompts()
    kwargs = dict(attention_mask=attention, gen_length=8, block_length=4, steps=8, group_size=8,
                  cache=cache, threshold=threshold)
    sampled = generate(model, prompt, temperature=1.0, seed=0, **kwargs).sequences[:, 6:]
    assert _duplicate_fraction(sampled, 8) <= 0.125
    greedy = generate(model, prompt, **kwargs).sequences[:, 6:]  # the measure can fail: 7 of 8 repeat
    assert _duplicate_fraction(greedy, 8) == pytest.approx(7 / 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cache="full"), "cache: expected one of"),
        (dict(threshold=1.5), "threshold: expected"),
        (dict(threshold=True), "threshold: expected"),
        (dict(threshold=0.5, remasking="random"), "threshold: compares"),
    ],
)
def test_invalid_accelerated_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(_llada(), torch.zeros(1, 2, dtype=torch.long), gen_length=4, block_length=4, steps=4, **kwargs)


def test_models_without_cache_support_get_a_clear_error():
    llada = _llada()  # the protocol's required part only: no kv_cache_modes, no new_kv_cache
    model = types.SimpleNamespace(hidden_states=llada.hidden_states, lm_head_weight=llada.lm_head_weight,
                                  lm_head_bias=None, mask_token_id=llada.mask_token_id, eos_token_id=None)
    with pytest.raises(ValueError, match="cache: SimpleNamespace offers no KV cache, not 'prefix'"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), gen_length=4, block_length=4, steps=4, cache="prefix")
    assert generate(model, torch.zeros(1, 2, dtype=torch.long), gen_length=4, block_length=4, steps=4).forwards == 4


def test_model_cache_arguments_are_checked():
    model = _llada()
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="cache_start: needs a kv_cache"):
        model(x, cache_start=0)
    with pytest.raises(ValueError, match="kv_cache: empty"):
        model(x, kv_cache=KVCache(), cache_start=0)
    cache = KVCache()
    model(x, kv_cache=cache)
    with pytest.raises(ValueError, match="cache_start: positions 3..4"):
        model(x[:, :2], kv_cache=cache, cache_start=3)
    with pytest.raises(ValueError, match="cache_start: expected an int"):
        model(x[:, :2], kv_cache=cache, cache_start=-1)
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        model(x[:, :2], torch.ones(1, 2), kv_cache=cache, cache_start=0)


@pytest.mark.parametrize("override, message", [
    ("rollout.cache=full", "rollout.cache: expected one of [None, 'prefix', 'dual']"),
    ("rollout.threshold=1.5", "rollout.threshold: expected a float >= 0 and <= 1"),
    ("rollout.threshold=-0.1", "rollout.threshold: expected a float >= 0"),
    ("rollout.threshold=high", "rollout.threshold: expected float"),
])
def test_rollout_config_cache_and_threshold_are_checked(override, message):
    from bgpo.train import load_config

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, ["model.tokenizer=char", override])
    with pytest.raises(ValueError, match="rollout.threshold: compares low_confidence"):
        load_config(None, ["model.tokenizer=char", "rollout.threshold=0.9", "rollout.remasking=random"])
    for cache in ("prefix", "dual"):  # the model, loaded later, says whether it can (Trainer)
        assert load_config(None, ["model.tokenizer=char", f"rollout.cache={cache}", "model.hf=true",
                                  "model.path=x"]).rollout.cache == cache


def test_trainer_samples_with_cache_and_threshold_and_logs_the_sampler(tmp_path):
    import json

    from bgpo.train import Trainer, load_config

    config = load_config(None, [
        "model.tokenizer=char", "data.prompt_template={puzzle}=", "data.train_size=8", "data.eval_size=2",
        "data.generator={min_empty: 8, max_empty: 10}", "rollout.group_size=2", "rollout.gen_length=16",
        "rollout.block_length=8", "rollout.steps=4", "policy.num_samples=1", "batch_size=2", "steps=1",
        "log.progress=false", "log.tensorboard=false", "sft.steps=0", f"output_dir={tmp_path}",
        "rollout.cache=dual", "rollout.threshold=0.0",
    ])
    Trainer(config).train()
    train = next(r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "train")
    # threshold 0: every block in one forward, every token decoded in parallel
    assert train["rollout_forwards_per_answer"] == 2 and train["rollout_parallel_fraction"] == 1.0
    assert train["rollout_tokens_per_s"] > 0
