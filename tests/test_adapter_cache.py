"""The Hugging Face adapter's KV caches (bgpo.models.adapter_cache): prefix and dual, through transformers
``Cache`` objects and the legacy (key, value) tuples of OLMo-derived remote code; shifted families; the one-time
check that refuses a model whose cache cannot serve (causal with past keys, masks ignored); generate(cache=...)
through the adapter.

What is exact: a forward over positions s .. e-1 against a cache filled from the same sequence equals the full
forward (up to summation order).  With one layer the sampler's caches are exact token for token (a cached
token's layer-0 key depends on the token and its position only, and cached tokens do not change); with more
layers the keys of the prompt go stale once the response changes (see tests/test_rollout_cache.py).
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgpo.models import HFMaskedDiffusionAdapter, UnsupportedModelError
from bgpo.models.rotary import apply_rotary, rotary_tables
from bgpo.rollout import generate

transformers = pytest.importorskip("transformers")


def _bidirectional_llama(layers: int = 2, *, tie: bool = False, seed: int = 0, dream: bool = False):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    config.mask_token_id = 95
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    if dream:
        model.config.model_type = "dream"  # the adapter shifts: hidden state t - 1 predicts token t
    return model.double().eval()


class _RemoteStyleLM(nn.Module):
    """The shape of OLMo-derived remote code (LLaDA's): ``past_key_values`` as per-layer (key, value) tuples
    (B, heads, T, head_dim), new keys appended after the cached ones, RoPE positions continuing from the cache
    (no ``position_ids``: the adapter offers the prefix cache only).  ``causal_with_past`` adds a causal bias
    whenever past keys are given; ``returns_cache=False`` never returns a cache; ``ignore_mask`` ignores
    attention masks, as LLaDA's code does."""

    def __init__(self, *, causal_with_past=False, returns_cache=True, ignore_mask=False, vocab=64, dim=32, heads=4,
                 layers=2):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="llada", mask_token_id=vocab - 1, eos_token_id=1)
        self.heads, self.causal_with_past, self.returns_cache = heads, causal_with_past, returns_cache
        self.ignore_mask = ignore_mask
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "out": nn.Linear(dim, dim)})
                                    for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
        return self._forward(input_ids, attention_mask, past_key_values, use_cache)

    def _forward(self, input_ids, attention_mask, past_key_values, use_cache, position_ids=None):
        batch, length = input_ids.shape
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
        positions = torch.arange(past_length, past_length + length) if position_ids is None else position_ids
        rope = rotary_tables(positions, 32 // self.heads, 10000.0)
        allowed = torch.ones(batch, 1, length, past_length + length, dtype=torch.bool)
        if attention_mask is not None and not self.ignore_mask:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        if self.causal_with_past and past_key_values is not None:
            allowed = allowed & torch.ones(length, past_length + length, dtype=torch.bool).tril(past_length)
        x, presents = self.embed(input_ids), []
        for layer, block in enumerate(self.blocks):
            q, k, v = block["qkv"](x).view(batch, length, 3, self.heads, -1).unbind(2)
            q, k = apply_rotary(q, *rope).transpose(1, 2), apply_rotary(k, *rope).transpose(1, 2)
            v = v.transpose(1, 2)
            if past_key_values is not None:
                k = torch.cat((past_key_values[layer][0], k), dim=-2)
                v = torch.cat((past_key_values[layer][1], v), dim=-2)
            presents.append((k, v))
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            x = x + block["out"](attended.transpose(1, 2).reshape(batch, length, -1))
        cache = presents if use_cache and self.returns_cache else None
        return types.SimpleNamespace(logits=self.head(x), past_key_values=cache)


class _RemoteStyleWithPositions(_RemoteStyleLM):
    """The same, taking ``position_ids`` (so the adapter offers the dual cache too)."""

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, position_ids=None):
        return self._forward(input_ids, attention_mask, past_key_values, use_cache, position_ids)


def _remote_style(positions=False, **kwargs) -> _RemoteStyleLM:
    torch.manual_seed(0)
    return (_RemoteStyleWithPositions if positions else _RemoteStyleLM)(**kwargs).double().eval()


def _padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 60, (3, 14))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


@pytest.mark.parametrize("build, modes", [
    (lambda: _bidirectional_llama(), ("prefix", "dual")),
    (lambda: _bidirectional_llama(tie=True), ("prefix", "dual")),
    (lambda: _bidirectional_llama(dream=True), ("prefix", "dual")),
    (lambda: _remote_style(), ("prefix",)),
    (lambda: _remote_style(positions=True), ("prefix", "dual")),
], ids=["llama", "tied", "dream-shift", "tuple-cache", "tuple-cache-positions"])
def test_cached_slice_forward_equals_full_forward_on_a_fresh_cache(build, modes):
    adapter = HFMaskedDiffusionAdapter(build())
    assert adapter.kv_cache_modes == modes
    ids, mask = _padded_batch()
    cache = adapter.new_kv_cache()
    full = adapter.hidden_states(ids, mask, kv_cache=cache)
    torch.testing.assert_close(full, adapter.hidden_states(ids, mask), rtol=0, atol=1e-12)
    dual_cuts = ((6, 10), (9, 12), (2, 4)) if "dual" in modes else ()
    for start, end in dual_cuts + ((11, 14), (9, 14), (6, 14)):  # several cuts of one cache: dual, then shorter
        part = adapter.hidden_states(ids[:, start:end], mask, kv_cache=cache, cache_start=start)
        torch.testing.assert_close(part, full[:, start:end], rtol=0, atol=1e-10)
    assert adapter._verified_caches == set(modes)  # each checked once
    if "dual" in modes:  # the prefix cuts left the refresh's keys of 0 .. 5 (Dream: 0 .. 4) only: no dual cut now
        last = 4 if adapter.shift else 5
        message = rf"cache_start: the cache holds the refresh's keys of positions 0 \.\. {last} only"
        with pytest.raises(ValueError, match=message):
            adapter.hidden_states(ids[:, 6:10], mask, kv_cache=cache, cache_start=6)
    else:
        with pytest.raises(ValueError, match="need the dual cache, and _RemoteStyleLM's forward takes no position_ids"):
            adapter.hidden_states(ids[:, 6:10], mask, kv_cache=cache, cache_start=6)


@pytest.mark.parametrize("block_length", [8, 4])
@pytest.mark.parametrize("build, cache", [
    (lambda: _bidirectional_llama(1), "prefix"), (lambda: _bidirectional_llama(1), "dual"),
    (lambda: _bidirectional_llama(1, dream=True), "dual"), (lambda: _remote_style(layers=1), "prefix"),
    (lambda: _remote_style(positions=True, layers=1), "dual"),
], ids=["llama-prefix", "llama-dual", "dream-dual", "tuple-cache-prefix", "tuple-cache-dual"])
def test_one_layer_cache_reproduces_the_exact_sampler(build, cache, block_length):
    adapter = HFMaskedDiffusionAdapter(build())
    ids, mask = _padded_batch()
    kwargs = dict(attention_mask=mask[:, :6], gen_length=8, block_length=block_length, steps=8, return_order=True)
    exact = generate(adapter, ids[:, :6], **kwargs)
    cached = generate(adapter, ids[:, :6], cache=cache, **kwargs)
    assert torch.equal(cached.sequences, exact.sequences) and torch.equal(cached.order, exact.order)


def test_prefix_cache_first_step_exact_later_steps_approximate():
    adapter = HFMaskedDiffusionAdapter(_bidirectional_llama(2))
    ids, mask = _padded_batch()
    kwargs = dict(attention_mask=mask[:, :6], gen_length=8, block_length=8, steps=8, return_order=True)
    exact = generate(adapter, ids[:, :6], **kwargs)
    cached = generate(adapter, ids[:, :6], cache="prefix", **kwargs)
    first = exact.order == 0
    assert torch.equal(cached.order == 0, first)
    assert torch.equal(cached.sequences[:, 6:][first], exact.sequences[:, 6:][first])
    assert cached.forwards == exact.forwards == 8
    # Stale prompt keys after the first step: the later steps' logits differ from the full forward's.
    cache = adapter.new_kv_cache()
    x = cached.sequences.clone()
    x[:, 6:] = adapter.mask_token_id
    adapter.hidden_states(x, mask.new_ones(x.shape), kv_cache=cache)
    x[:, 6:9] = cached.sequences[:, 6:9]
    stale = adapter.hidden_states(x[:, 6:], mask.new_ones(x.shape), kv_cache=cache, cache_start=6)
    assert (stale - adapter.hidden_states(x, mask.new_ones(x.shape))[:, 6:]).abs().max() > 1e-6


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_with_threshold_and_groups(cache):
    adapter = HFMaskedDiffusionAdapter(_bidirectional_llama(2))
    ids, mask = _padded_batch()
    out = generate(adapter, ids[:, :6], attention_mask=mask[:, :6], gen_length=8, block_length=4, steps=8,
                   cache=cache, threshold=0.2, temperature=1.0, seed=0, group_size=4, return_order=True)
    response = out.sequences[:, 6:]
    assert out.sequences.shape == (12, 14)
    # every position decoded, but where the sampled token was the mask token itself (-1: still masked)
    assert torch.equal(out.order >= 0, response != adapter.mask_token_id) and (out.order >= 0).float().mean() > 0.9
    assert 2 <= out.forwards <= 8
    groups = response.view(3, 4, -1)
    assert all(len({tuple(r.tolist()) for r in g}) > 1 for g in groups)  # temperature > 0: diverse groups


def test_dual_cache_refused_without_position_ids_with_the_modes_offered():
    adapter = HFMaskedDiffusionAdapter(_remote_style(layers=1))
    message = r"cache: HFMaskedDiffusionAdapter offers the KV caches \('prefix',\), not 'dual'"
    with pytest.raises(ValueError, match=message):
        generate(adapter, torch.zeros(1, 2, dtype=torch.long), gen_length=4, block_length=4, steps=4, cache="dual")


def test_model_whose_cache_is_causal_is_refused_with_the_error_measured():
    adapter = HFMaskedDiffusionAdapter(_remote_style(causal_with_past=True))
    ids, mask = _padded_batch()
    with pytest.raises(UnsupportedModelError, match=r"cache: _RemoteStyleLM's forward against its own cache \(prefix\) "
                                                    r"differs from its full forward by [0-9.e+-]+ \(largest relative"):
        generate(adapter, ids[:, :6], attention_mask=mask[:, :6], gen_length=8, block_length=4, steps=8,
                 cache="prefix")
    assert not adapter._verified_caches
    exact = generate(adapter, ids[:, :6], attention_mask=mask[:, :6], gen_length=8, block_length=4, steps=8)
    assert exact.sequences.shape == (3, 14)  # the model still samples without a cache


def test_model_ignoring_masks_is_refused_the_dual_cache():
    """Dual hides the cached copies of the slice's positions with the mask: a model that ignores masks (as
    LLaDA's code does) would count them twice; the check sees it.  Its prefix cache needs no mask and works."""
    adapter = HFMaskedDiffusionAdapter(_remote_style(positions=True, ignore_mask=True))
    prompt = torch.randint(0, 60, (2, 6))
    kwargs = dict(gen_length=8, block_length=4, steps=8)
    with pytest.raises(UnsupportedModelError, match=r"\(dual\) differs from its full forward"):
        generate(adapter, prompt, cache="dual", **kwargs)
    assert generate(adapter, prompt, cache="prefix", **kwargs).forwards == 8
    assert adapter._verified_caches == {"prefix"}


def test_model_without_a_cache_is_refused():
    adapter = HFMaskedDiffusionAdapter(_remote_style(returns_cache=False))
    with pytest.raises(UnsupportedModelError, match="returned no cache from a forward with use_cache=True"):
        generate(adapter, torch.zeros(1, 3, dtype=torch.long), gen_length=4, block_length=4, steps=4, cache="prefix")


def test_cache_arguments_are_checked():
    adapter = HFMaskedDiffusionAdapter(_bidirectional_llama(1))
    ids, mask = _padded_batch()
    with pytest.raises(ValueError, match="cache_start: needs a kv_cache"):
        adapter.hidden_states(ids, cache_start=2)
    with pytest.raises(ValueError, match="kv_cache: empty"):
        adapter.hidden_states(ids[:, 2:], kv_cache=adapter.new_kv_cache(), cache_start=2)
    with pytest.raises(ValueError, match="kv_cache: expected the adapter's new_kv_cache"):
        adapter.hidden_states(ids, kv_cache=object())
    cache = adapter.new_kv_cache()
    adapter.hidden_states(ids, mask, kv_cache=cache)
    with pytest.raises(ValueError, match="cache_start: expected an int >= 0"):
        adapter.hidden_states(ids[:, 2:], mask, kv_cache=cache, cache_start=-2)
    with pytest.raises(ValueError, match=r"cache_start: input_ids of shape \(3, 12\) from position 4 do not fit"):
        adapter.hidden_states(ids[:, 2:], mask, kv_cache=cache, cache_start=4)  # past the end
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(3, 14\)"):
        adapter.hidden_states(ids[:, 2:], mask[:, 2:], kv_cache=cache, cache_start=2)
