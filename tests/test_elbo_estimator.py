"""The MC estimate of the ELBO is unbiased (SPEC §1): for a context-free model, E[ℓ_j] = Σ_i log q_i(y_i).

Each scheme is checked against the closed form with a tolerance of a few standard errors, and the same
draws with a wrong weight (the classic mistakes: 1/t and L/l swapped, l off by one) must fail it.
"""
import pytest
import torch

import bgpo

DRAWS = 6000
Z_LIMIT = 4.5


def _context_free_batch(L, draws):
    """``draws`` copies of one response of length L; log q_i in [-3, -0.1] for the clean tokens."""
    logq = -torch.linspace(0.1, 3.0, L)
    ids = torch.zeros(draws, L + 4, dtype=torch.long)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 4:] = True  # 4 prompt tokens, never masked
    full_logq = torch.cat([torch.zeros(4), logq]).expand(draws, -1)
    return ids, maskable, full_logq, float(logq.sum())


def _z_score(values, target):
    return (values.double().mean() - target) / (values.double().std() / values.numel() ** 0.5)


@pytest.mark.parametrize("L,n", [(16, 4), (7, 3), (2, 5)])
def test_stratified_is_unbiased_and_wrong_weights_are_caught(L, n):
    ids, maskable, logq, expected = _context_free_batch(L, DRAWS)
    terms, wrong = [], {"l+1": [], "l-1": [], "l/L": []}
    for j in range(n):  # sequence ids differ per row: independent draws of the random offset and positions
        out = bgpo.random_mask(ids, maskable, mask_id=1, seed=2024, sample_index=j, num_samples=n)
        picked = (logq * out.masked).sum(1)
        terms.append(out.elbo_weight * picked)
        l = out.masked.sum(1).double()
        wrong["l+1"].append(L / (l + 1) * picked)
        wrong["l-1"].append(L / (l - 1).clamp_min(0.5) * picked)
        wrong["l/L"].append(l / L * picked)  # 1/t and L/l swapped
    assert abs(_z_score(torch.cat(terms), expected)) < Z_LIMIT
    for name, values in wrong.items():
        assert abs(_z_score(torch.cat(values), expected)) > Z_LIMIT, name


@pytest.mark.parametrize("stratify_t", [False, True])
def test_bernoulli_is_unbiased_and_wrong_weights_are_caught(stratify_t):
    L, n = 12, 4
    ids, maskable, logq, expected = _context_free_batch(L, DRAWS)
    terms, wrong = [], {"t": [], "1": [], "1/(t+1/L)": []}
    for j in range(n):
        out = bgpo.random_mask(ids, maskable, mask_id=1, seed=77, sample_index=j, num_samples=n,
                               scheme="bernoulli", t_min=0.05, stratify_t=stratify_t)
        picked = (logq * out.masked).sum(1)
        t = 1.0 / out.elbo_weight.double()
        terms.append(out.elbo_weight * picked)
        wrong["t"].append(t * picked)  # weight inverted
        wrong["1"].append(picked)  # weight forgotten
        wrong["1/(t+1/L)"].append(picked / (t + 1.0 / L))  # t off by one position
    assert abs(_z_score(torch.cat(terms), expected)) < Z_LIMIT
    for name, values in wrong.items():
        assert abs(_z_score(torch.cat(values), expected)) > Z_LIMIT, name


def test_elbo_from_logits_matches_the_definition():
    B, L, V = 3, 5, 11
    logits = torch.randn(B, L, V)
    targets = torch.randint(0, V, (B, L))
    masked = torch.rand(B, L) < 0.5
    weight = torch.tensor([1.0, 2.5, 4.0])
    expected = torch.stack([
        weight[b] * sum(logits[b, i].log_softmax(-1)[targets[b, i]] for i in range(L) if masked[b, i])
        if masked[b].any() else torch.tensor(0.0)
        for b in range(B)
    ])
    assert torch.allclose(bgpo.elbo_from_logits(logits, targets, masked, weight), expected, atol=1e-5)
