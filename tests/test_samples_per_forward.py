"""Several MC samples per forward (``samples_per_forward``): the same masks as one call per sample, the same
gradient as k = 1, and a clear refusal for the objectives that are not linear in the samples."""
import pytest
import torch

import bgpo
from bgpo.models import LLaDAConfig, LLaDAModelLM
from bgpo.policy_update import PolicyBatch, accumulate_policy_gradient, old_policy_elbos


@pytest.mark.parametrize("scheme", ["stratified", "bernoulli"])
def test_random_mask_with_several_indices_stacks_the_single_draws(scheme):
    ids = torch.randint(0, 50, (3, 20))
    maskable = torch.rand(3, 20) < 0.8
    common = dict(mask_id=99, seed=7, num_samples=5, sequence_ids=torch.tensor([4, 0, 9]), scheme=scheme)
    several = bgpo.random_mask(ids, maskable, sample_index=[3, 1, 4], **common)
    assert several.noisy_ids.shape == (3, 3, 20) and several.elbo_weight.shape == (3, 3)
    for s, j in enumerate([3, 1, 4]):
        one = bgpo.random_mask(ids, maskable, sample_index=j, **common)
        for field, value in zip(one._fields, one):
            torch.testing.assert_close(getattr(several, field)[s], value, rtol=0, atol=0, msg=field)
    stacked = bgpo.random_mask(ids, maskable, sample_index=range(2, 4), **common)
    torch.testing.assert_close(stacked.masked, torch.stack(
        [bgpo.random_mask(ids, maskable, sample_index=j, **common).masked for j in (2, 3)]))


@pytest.mark.parametrize("index", [[], [0, 5], "0", torch.tensor([0]), [True]])
def test_random_mask_rejects_bad_sample_indices(index):
    with pytest.raises(ValueError, match="sample_index"):
        bgpo.random_mask(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), mask_id=9, seed=0,
                         sample_index=index, num_samples=5)


def _setup():
    torch.manual_seed(0)
    model = LLaDAModelLM(LLaDAConfig.preset("tiny"))
    ids = torch.randint(0, 100, (8, 14))
    response = torch.ones(8, 8, dtype=torch.bool)
    response[0, 5:] = False
    response[3, 2:] = False
    attention = torch.ones(8, 14, dtype=torch.long)
    attention[1, :2] = 0  # a left-padded prompt
    batch = PolicyBatch(ids, 6, response, torch.randn(8), torch.arange(10, 18), attention_mask=attention,
                        group_size=4)
    return model, batch


def _gradient(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = accumulate_policy_gradient(model, batch, seed=3, **kwargs)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["bgpo", "wd1"])
@pytest.mark.parametrize("k", [2, 3, 5])  # 3 does not divide n_t = 5; 5 is all of them in one forward
def test_samples_per_forward_gives_the_gradient_of_one_sample_per_forward(objective, k):
    model, batch = _setup()
    old = old_policy_elbos(model, batch, num_samples=5, seed=3) - 0.1  # off-policy: the ratio is not 1
    ref = old_policy_elbos(model, batch, num_samples=5, seed=3) + 0.2
    common = dict(objective=objective, num_samples=5, micro_batch_size=4, ref_elbos=ref, beta=0.3)
    if objective == "bgpo":
        common.update(old_elbos=old, clip=(0.2, 0.3))
    base, expected = _gradient(model, batch, **common)
    flags = []
    out, grads = _gradient(model, batch, samples_per_forward=k, gradient_sync=flags.append, **common)
    assert flags == [False, True] and len(expected) == len(grads)
    assert out["loss"] == pytest.approx(base["loss"], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(out["elbo"], base["elbo"], rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_old_policy_elbos_with_samples_per_forward():
    model, batch = _setup()
    torch.testing.assert_close(old_policy_elbos(model, batch, num_samples=5, seed=3, samples_per_forward=2),
                               old_policy_elbos(model, batch, num_samples=5, seed=3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["vrpo", "spg", "diffu_grpo"])
def test_objectives_not_linear_in_the_samples_refuse_several_per_forward(objective):
    model, batch = _setup()
    with pytest.raises(ValueError, match=f"samples_per_forward: objective '{objective}' is not linear"):
        accumulate_policy_gradient(model, batch, objective=objective, num_samples=4, seed=0, samples_per_forward=2)


@pytest.mark.parametrize("k", [0, 1.5, True])
def test_samples_per_forward_must_be_a_positive_int(k):
    model, batch = _setup()
    with pytest.raises(ValueError, match="samples_per_forward: expected an int"):
        accumulate_policy_gradient(model, batch, num_samples=4, seed=0, samples_per_forward=k)


def test_memory_grows_with_samples_per_forward_not_with_n_t():
    from bgpo.memory import track_peak_memory

    model, batch = _setup()
    peaks = {}
    for n_t, k in ((2, 1), (8, 1), (8, 4)):
        with track_peak_memory("cpu") as mem:
            _gradient(model, batch, num_samples=n_t, samples_per_forward=k)
        peaks[n_t, k] = mem.peak_bytes
    assert peaks[8, 1] <= 1.1 * peaks[2, 1] and peaks[8, 4] > 1.5 * peaks[8, 1], peaks


def test_policy_samples_per_forward_config():
    from bgpo.train import load_config

    assert load_config(None, ["model.tokenizer=char", "policy.samples_per_forward=4"]).policy.samples_per_forward == 4
    with pytest.raises(ValueError, match="policy.samples_per_forward: objective 'vrpo' is not linear"):
        load_config(None, ["model.tokenizer=char", "policy.objective=vrpo", "policy.samples_per_forward=2"])
    with pytest.raises(ValueError, match="policy.samples_per_forward"):
        load_config(None, ["model.tokenizer=char", "policy.samples_per_forward=0"])
