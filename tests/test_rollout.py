"""bgpo.rollout.generate: LLaDA's block diffusion sampler."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bgpo.models import LLaDAConfig, LLaDAModelLM
from bgpo.rollout import generate, transfer_schedule

MASK, EOS = 5, 4  # ids of the table model below (vocabulary 0..5)


class TableModel(nn.Module):
    """A model whose logits are known: position t always gets ``table[t]``, whatever the tokens.

    Hidden state t is the one-hot vector e_t and the LM head is ``table`` transposed, so
    ``hidden_states @ lm_head_weight.T`` reads the table row by row.
    """

    mask_token_id = MASK
    eos_token_id = EOS

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.head = nn.Parameter(table.T.contiguous())
        self.blocks = nn.ModuleList()
        self.calls: list[torch.Tensor] = []

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.head

    @property
    def lm_head_bias(self) -> None:
        return None

    def hidden_states(self, input_ids, attention_mask=None):
        self.calls.append(input_ids.clone())
        batch, length = input_ids.shape
        return torch.eye(length, dtype=self.head.dtype).expand(batch, length, length)

    def logits(self, input_ids, attention_mask=None):
        return self.hidden_states(input_ids, attention_mask) @ self.head.T


def _peaked(token: int, p: float, vocab: int = 6) -> torch.Tensor:
    """Log-probabilities with ``token`` at probability ``p``, the rest spread evenly."""
    probs = torch.full((vocab,), (1 - p) / (vocab - 1), dtype=torch.float64)
    probs[token] = p
    return probs.log()


def _table_model(prompt_length: int, rows: list[tuple[int, float]]) -> TableModel:
    prompt_rows = [_peaked(0, 0.5)] * prompt_length
    return TableModel(torch.stack(prompt_rows + [_peaked(t, p) for t, p in rows]))


def _tiny_llada(seed: int = 0) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(LLaDAConfig.preset("tiny")).double().eval()


def test_transfer_schedule_gives_the_remainder_to_the_earliest_steps():
    assert transfer_schedule(5, 3) == [2, 2, 1]
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(3, 5) == [1, 1, 1, 0, 0]
    assert sum(transfer_schedule(32, 7)) == 32


def test_greedy_unmasking_order_matches_hand_computation():
    # Prompt of 2, response of 6 in 2 blocks of 3, 4 steps: 2 per block, unmasking 2 then 1 token.
    # Confidences: block 0 = (.50, .90, .70), block 1 = (.95, .30, .60).  Position 3 (.95) is the most
    # confident of all but lies in block 1, so it must wait for block 0 to finish.
    #   step 0: top-2 of block 0 -> positions 1 (.90), 2 (.70)    step 1: position 0
    #   step 2: top-2 of block 1 -> positions 3 (.95), 5 (.60)    step 3: position 4
    rows = [(1, 0.50), (2, 0.90), (3, 0.70), (0, 0.95), (1, 0.30), (2, 0.60)]
    model = _table_model(2, rows)
    prompt = torch.tensor([[3, 1], [2, 2]])
    out = generate(model, prompt, gen_length=6, block_length=3, steps=4, return_order=True)
    assert out.order.tolist() == [[1, 0, 0, 2, 3, 2]] * 2
    assert out.sequences.tolist() == [[3, 1, 1, 2, 3, 0, 1, 2], [2, 2, 1, 2, 3, 0, 1, 2]]
    # Step 0 saw the prompt followed by six masks; the prompt is never touched.
    assert model.calls[0].tolist()[0] == [3, 1] + [MASK] * 6


def test_order_is_minus_one_where_the_mask_token_itself_was_chosen():
    """Regression: a position whose chosen prediction was the mask token (left masked, as LLaDA's sampler
    does) got the step number in ``order``, as if it had been unmasked."""
    model = _table_model(2, [(1, 0.9), (MASK, 0.95), (2, 0.8), (3, 0.7)])
    out = generate(model, torch.zeros(1, 2, dtype=torch.long), gen_length=4, block_length=4, steps=4,
                   return_order=True)
    response, order = out.sequences[0, 2:].tolist(), out.order[0].tolist()
    assert all((token == MASK) == (step == -1) for token, step in zip(response, order)), (response, order)


def test_random_remasking_follows_the_schedule():
    model = _table_model(1, [(1, 0.5)] * 10)
    out = generate(model, torch.tensor([[0]] * 3), gen_length=10, block_length=5, steps=6,
                   remasking="random", seed=3, return_order=True)
    for row in out.order.tolist():
        # 3 steps per block of 5: 2, 2, 1 tokens; block 0 uses steps 0-2, block 1 steps 3-5.
        assert sorted(row[:5]) == [0, 0, 1, 1, 2] and sorted(row[5:]) == [3, 3, 4, 4, 5]


def test_sampling_is_deterministic_for_a_seed():
    model = _tiny_llada()
    prompt = torch.randint(0, 120, (2, 4))
    kwargs = dict(gen_length=8, block_length=4, steps=4, temperature=1.0, return_order=True)
    first = generate(model, prompt, seed=7, **kwargs)
    again = generate(model, prompt, seed=7, **kwargs)
    assert torch.equal(first.sequences, again.sequences) and torch.equal(first.order, again.order)
    generator = torch.Generator().manual_seed(7)
    assert torch.equal(generate(model, prompt, seed=generator, **kwargs).sequences, first.sequences)
    others = [generate(model, prompt, seed=s, **kwargs).sequences for s in (8, 9)]
    assert any(not torch.equal(o, first.sequences) for o in others)
    # Temperature 0 needs no seed.
    greedy = dict(gen_length=8, block_length=4, steps=8)
    assert torch.equal(generate(model, prompt, **greedy).sequences, generate(model, prompt, **greedy).sequences)


def test_group_size_repeats_each_prompt():
    model = _tiny_llada()
    prompt = torch.randint(0, 120, (2, 3))
    out = generate(model, prompt, gen_length=4, block_length=4, steps=2, group_size=3, temperature=1.0, seed=0)
    assert out.sequences.shape == (6, 7) and out.order is None
    assert torch.equal(out.sequences[:, :3], prompt.repeat_interleave(3, dim=0))
    greedy = generate(model, prompt, gen_length=4, block_length=4, steps=2, group_size=3).sequences
    assert torch.equal(greedy[0], greedy[2]) and torch.equal(greedy[3], greedy[5])


def test_suppress_eos():
    rows = [(EOS, 0.9), (1, 0.6), (EOS, 0.8), (2, 0.7)]
    model = _table_model(1, rows)
    prompt = torch.tensor([[0]])
    kwargs = dict(gen_length=4, block_length=4, steps=4)
    assert generate(model, prompt, **kwargs).sequences[0, 1:].tolist() == [EOS, 1, EOS, 2]
    suppressed = generate(model, prompt, suppress_eos=True, **kwargs).sequences[0, 1:]
    assert EOS not in suppressed.tolist() and suppressed.tolist()[1::2] == [1, 2]
    with pytest.raises(ValueError, match="eos_id"):
        generate(_NoEos(model), prompt, suppress_eos=True, **kwargs)


class _NoEos(nn.Module):
    """A model that does not know its EOS id."""

    eos_token_id = None

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.mask_token_id = inner.mask_token_id
        self.lm_head_weight, self.lm_head_bias = inner.lm_head_weight, None

    def hidden_states(self, input_ids, attention_mask=None):
        return self.inner.hidden_states(input_ids, attention_mask)


def test_left_padded_batch_matches_unpadded_prompts():
    model = _tiny_llada()
    short, long = torch.randint(0, 120, (1, 3)), torch.randint(0, 120, (1, 6))
    pad = model.config.pad_token_id
    batch = torch.cat((torch.cat((torch.full((1, 3), pad), short), dim=1), long))
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    kwargs = dict(gen_length=8, block_length=4, steps=8, return_order=True)
    padded = generate(model, batch, attention_mask=mask, **kwargs)
    for row, prompt in enumerate((short, long)):
        alone = generate(model, prompt, **kwargs)
        assert torch.equal(padded.sequences[row, 6:], alone.sequences[0, prompt.shape[1]:])
        assert torch.equal(padded.order[row], alone.order[0])
    assert torch.equal(padded.sequences[:, :6], batch)
    # Without the mask the padding is visible and changes the answer (the mask is really used).
    unmasked = generate(model, batch, **kwargs)
    assert not torch.equal(unmasked.sequences[0], padded.sequences[0])


def test_classifier_free_guidance_one_step():
    model = _tiny_llada()
    prompt = torch.randint(0, 120, (2, 5))
    scale = 1.5
    out = generate(model, prompt, gen_length=1, block_length=1, steps=1, cfg_scale=scale)
    x = torch.cat((prompt, torch.full((2, 1), model.mask_token_id)), dim=1)
    unconditional = torch.full_like(x, model.mask_token_id)
    cond, uncond = model.logits(x)[:, -1], model.logits(unconditional)[:, -1]
    expected = (uncond + (scale + 1) * (cond - uncond)).argmax(-1)
    assert torch.equal(out.sequences[:, -1], expected)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(gen_length=10, block_length=4, steps=4), "gen_length"),
        (dict(gen_length=8, block_length=4, steps=3), "steps"),
        (dict(gen_length=8, block_length=0, steps=4), "block_length"),
        (dict(gen_length=8, block_length=4, steps=4, remasking="entropy"), "remasking"),
        (dict(gen_length=8, block_length=4, steps=4, temperature=-1.0), "temperature"),
        (dict(gen_length=8, block_length=4, steps=4, temperature=math.nan), "temperature"),
        (dict(gen_length=8, block_length=4, steps=4, cfg_scale=-0.5), "cfg_scale"),
        (dict(gen_length=8, block_length=4, steps=4, seed="0"), "seed"),
        (dict(gen_length=8, block_length=4, steps=4, group_size=0), "group_size"),
        (dict(gen_length=8, block_length=4, steps=4, attention_mask=torch.ones(2, 3)), "attention_mask"),
    ],
)
def test_invalid_arguments_are_named(kwargs, name):
    model = _table_model(2, [(1, 0.5)] * 10)
    with pytest.raises(ValueError, match=name):
        generate(model, torch.zeros(2, 2, dtype=torch.long), **kwargs)


def test_rejects_models_without_the_protocol():
    with pytest.raises(ValueError, match="model: Linear is not a MaskedDiffusionLM"):
        generate(nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), gen_length=4, block_length=4, steps=4)


def test_generates_with_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    from bgpo.models import HFMaskedDiffusionAdapter

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, is_causal=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    for module in hf.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    model = HFMaskedDiffusionAdapter(hf, mask_token_id=63)
    prompt = torch.randint(0, 60, (2, 3))
    out = generate(model, prompt, gen_length=4, block_length=2, steps=4, temperature=0.7, seed=0, return_order=True)
    assert out.sequences.shape == (2, 7) and (out.order >= 0).all()
    assert torch.equal(out.sequences[:, :3], prompt)


def _reference_generate(model, prompt, *, gen_length, block_length, steps, attention_mask=None,
                        earlier_blocks=True):
    """LLaDA's published ``generate`` at temperature 0, low_confidence remasking, no CFG, written from
    the algorithm: the whole sequence is scored, positions after the current block get confidence
    -inf, every other masked position (earlier blocks included) competes for the step's transfers,
    and a chosen position takes its prediction (which may be the mask token itself).
    ``earlier_blocks=False``: the variant that also gives earlier blocks -inf (not LLaDA)."""
    mask_id = model.mask_token_id
    batch, prompt_length = prompt.shape
    x = torch.cat((prompt, torch.full((batch, gen_length), mask_id)), dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat((attention_mask, torch.ones(batch, gen_length, dtype=attention_mask.dtype)), 1)
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for block in range(num_blocks):
        end = prompt_length + (block + 1) * block_length
        masked = (x[:, end - block_length : end] == mask_id).sum(dim=1, keepdim=True)
        transfers = masked // per_block + (torch.arange(per_block)[None] < masked % per_block)
        for i in range(per_block):
            mask_index = x == mask_id
            logits = model.logits(x, attention_mask).float().double()  # the sampler's fp32 logits
            x0 = logits.argmax(dim=-1)
            x0_p = logits.softmax(dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, end:] = -math.inf
            if not earlier_blocks:
                x0_p[:, : end - block_length] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            for row in range(batch):
                chosen = confidence[row].topk(int(transfers[row, i])).indices
                x[row, chosen] = x0[row, chosen]
    return x


def test_earlier_blocks_still_masked_compete_as_in_llada():
    # Position 0 predicts the mask token with probability .9: it is chosen first and stays masked, and
    # as in LLaDA it keeps competing (and winning) in later steps and blocks, so nothing else is ever
    # unmasked.  (A sampler restricted to the current block would give [M, M, 3, 2].)
    model = _table_model(1, [(MASK, 0.9), (1, 0.5), (2, 0.6), (3, 0.7)])
    prompt = torch.tensor([[0]])
    out = generate(model, prompt, gen_length=4, block_length=2, steps=4, return_order=True)
    assert out.sequences.tolist() == [[0, MASK, MASK, MASK, MASK]]
    assert out.order.tolist() == [[-1, -1, -1, -1]]  # choosing the mask token unmasks nothing
    # Block 0 fills position 1 (.7) at step 0, position 0 (.6) at step 1 (it stays masked); in block 1
    # position 0 loses step 2 to position 3 (.65) and wins step 3 over position 2 (.55), which stays
    # masked.  (Restricted to the current block: [M, 1, 2, 3].)
    rows = [(MASK, 0.6), (1, 0.7), (2, 0.55), (3, 0.65)]
    out = generate(_table_model(1, rows), prompt, gen_length=4, block_length=2, steps=4, return_order=True)
    assert out.sequences.tolist() == [[0, MASK, 1, MASK, 3]]
    assert out.order.tolist() == [[-1, 0, -1, 2]]
    kwargs = dict(gen_length=4, block_length=2, steps=4)
    for first in ((MASK, 0.9), (MASK, 0.6)):
        model = _table_model(1, [first] + rows[1:])
        reference = _reference_generate(model, prompt, **kwargs)
        assert torch.equal(generate(model, prompt, **kwargs).sequences, reference)
        assert not torch.equal(reference, _reference_generate(model, prompt, earlier_blocks=False, **kwargs))


def test_greedy_tokens_equal_llada_reference_when_the_model_predicts_the_mask():
    model = _tiny_llada(0)
    with torch.no_grad():  # a mask-token row in the LM head: the mask id is predicted at some positions
        head = model.lm_head_weight
        head[model.mask_token_id] = 6.4 * head[:120].std() * torch.randn(head.shape[1], dtype=head.dtype)
    pad = model.config.pad_token_id
    prompt = torch.randint(0, 120, (4, 5))
    prompt[0, :2] = pad
    attention = torch.ones_like(prompt)
    attention[0, :2] = 0
    for gen_length, block_length, steps in ((12, 4, 12), (12, 3, 8)):
        kwargs = dict(gen_length=gen_length, block_length=block_length, steps=steps, attention_mask=attention)
        out = generate(model, prompt, **kwargs).sequences
        assert torch.equal(out, _reference_generate(model, prompt, **kwargs))
        assert (out[:, 5:] == model.mask_token_id).any()  # the mask id was predicted and kept
