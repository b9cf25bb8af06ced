"""bgpo.random_mask: the masking schemes of SPEC §1, reproducibility, and every backend bit-identical."""
import pytest
import torch

import bgpo
from bgpo import philox
from bgpo.backends import available_backends
from bgpo.ops.random_mask import random_mask_torch
from conftest import TEST_DEVICE

# every backend on the test device (BGPO_TEST_DEVICE), checked against the torch backend on the CPU
OTHER_BACKENDS = [b for b in available_backends("random_mask", TEST_DEVICE)
                  if b != "torch" or TEST_DEVICE.type != "cpu"]
MASK_ID = 99


def _batch(B=6, C=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (B, C), generator=g)
    maskable = torch.zeros(B, C, dtype=torch.bool)
    for b in range(B):  # prompt of 3..9 tokens, then a response of varying length, then padding
        start = 3 + b % 7
        length = [0, 1, 2, 17, C - start, 9][b % 6]
        maskable[b, start : start + length] = True
    return ids, maskable


def _draw(ids, maskable, **kw):
    defaults = dict(mask_id=MASK_ID, seed=11, sample_index=0, num_samples=4)
    return bgpo.random_mask(ids, maskable, **{**defaults, **kw})


@pytest.mark.parametrize("scheme", ["stratified", "bernoulli"])
def test_only_maskable_positions_are_masked(scheme):
    ids, maskable = _batch()
    for j in range(4):
        out = _draw(ids, maskable, scheme=scheme, sample_index=j)
        assert not (out.masked & ~maskable).any()
        assert torch.equal(out.noisy_ids, torch.where(out.masked, MASK_ID, ids))
        assert out.elbo_weight.dtype == torch.float32 and out.elbo_weight.shape == (ids.shape[0],)


def test_stratified_masks_exactly_l_j_with_weight_L_over_l():
    ids, maskable = _batch()
    L = maskable.sum(1)
    seed, n = 5, 6
    for j in range(n):
        out = _draw(ids, maskable, seed=seed, sample_index=j, num_samples=n)
        for b in range(ids.shape[0]):
            Lb = int(L[b])
            if Lb == 0:
                assert not out.masked[b].any() and out.elbo_weight[b] == 1.0
                continue
            # SPEC §1 with k = K / n, K = randint mod (L n): l = ((round(k + j L / n) - 1) mod L) + 1.
            word = int(philox.randint(seed, torch.tensor([(b << 32) + 2**31])))
            K = word % (Lb * n)
            rounded = (2 * (K + j * Lb) + n) // (2 * n)
            l_j = (rounded - 1) % Lb + 1
            assert int(out.masked[b].sum()) == l_j
            assert out.elbo_weight[b].item() == pytest.approx(Lb / l_j, rel=1e-6)


def test_stratified_counts_are_a_permutation_when_n_equals_L():
    """With n_t = L the evenly spread counts l_0..l_{n-1} visit every value 1..L once."""
    L = 12
    ids = torch.zeros(3, L, dtype=torch.long)
    maskable = torch.ones(3, L, dtype=torch.bool)
    counts = torch.stack([_draw(ids, maskable, seed=3, sample_index=j, num_samples=L).masked.sum(1) for j in range(L)])
    for b in range(3):
        assert sorted(counts[:, b].tolist()) == list(range(1, L + 1))


def test_stratified_chooses_the_lowest_ranked_draws():
    ids, maskable = _batch()
    seed, j = 9, 2
    out = _draw(ids, maskable, seed=seed, sample_index=j)
    C = ids.shape[1]
    for b in range(ids.shape[0]):
        cols = maskable[b].nonzero().squeeze(1)
        if cols.numel() == 0:
            continue
        offsets = (b << 32) + (j << 16) + cols
        ranked = cols[torch.argsort(philox.randint(seed, offsets) * C + cols)]
        chosen = ranked[: int(out.masked[b].sum())]
        assert torch.equal(out.masked[b].nonzero().squeeze(1), chosen.sort().values)


@pytest.mark.parametrize("stratify_t", [False, True])
def test_bernoulli_rates_and_weights(stratify_t):
    ids = torch.zeros(512, 64, dtype=torch.long)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    n, t_min = 4, 0.05
    for j in range(n):
        out = _draw(ids, maskable, scheme="bernoulli", sample_index=j, num_samples=n, t_min=t_min, stratify_t=stratify_t)
        t = 1.0 / out.elbo_weight
        assert (t > t_min).all() and (t <= 1.0).all()
        if stratify_t:  # t_j = 1 - (1 - t_min)(u + j)/n: sample j lives in its own stratum
            v = (1.0 - t) / (1.0 - t_min)
            assert (v >= j / n - 1e-6).all() and (v < (j + 1) / n + 1e-6).all()
        # each position masked with probability t_j: the masked fraction tracks t on average
        frac = out.masked.float().mean(1)
        assert (frac - t).abs().mean() < 0.06


def test_length_normalize_divides_by_L():
    ids, maskable = _batch()
    plain = _draw(ids, maskable)
    normed = _draw(ids, maskable, length_normalize=True)
    L = maskable.sum(1).clamp_min(1).float()
    expected = torch.where(maskable.any(1), plain.elbo_weight / L, torch.ones_like(L))
    assert torch.allclose(normed.elbo_weight, expected)
    assert torch.equal(normed.masked, plain.masked)


@pytest.mark.parametrize("scheme", ["stratified", "bernoulli"])
def test_mask_depends_on_sequence_id_not_row(scheme):
    ids, maskable = _batch()
    seq_ids = torch.tensor([40, 7, 1000, 3, 2**31 - 1, 12])
    full = _draw(ids, maskable, scheme=scheme, sequence_ids=seq_ids, sample_index=1)
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    permuted = _draw(ids[perm], maskable[perm], scheme=scheme, sequence_ids=seq_ids[perm], sample_index=1)
    assert torch.equal(permuted.masked, full.masked[perm])
    assert torch.equal(permuted.elbo_weight, full.elbo_weight[perm])
    micro = _draw(ids[2:4], maskable[2:4], scheme=scheme, sequence_ids=seq_ids[2:4], sample_index=1)
    assert torch.equal(micro.masked, full.masked[2:4])


def test_samples_and_seeds_differ():
    ids, maskable = _batch()
    a = _draw(ids, maskable, sample_index=0)
    assert not torch.equal(a.masked, _draw(ids, maskable, sample_index=1).masked)
    assert not torch.equal(a.masked, _draw(ids, maskable, seed=12).masked)
    assert torch.equal(a.masked, _draw(ids, maskable).masked)


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("scheme,stratify_t", [("stratified", False), ("bernoulli", False), ("bernoulli", True)])
def test_backends_bit_identical_to_torch(backend, scheme, stratify_t):
    for seed, C, n in [(0, 40, 4), (-1, 33, 16), (2**63 - 1, 128, 3), (12345, 7, 1)]:
        ids, maskable = _batch(B=6, C=C, seed=seed & 0xFF)
        seq_ids = torch.tensor([0, 5, 2**31 - 1, 77, 3, 2**20])
        for j in sorted({0, n // 2, n - 1}):
            kw = dict(seed=seed, sample_index=j, num_samples=n, scheme=scheme, stratify_t=stratify_t,
                      sequence_ids=seq_ids, t_min=0.01)
            ref = _draw(ids, maskable, backend="torch", **kw)
            out = _draw(ids.to(TEST_DEVICE), maskable.to(TEST_DEVICE), backend=backend,
                        **dict(kw, sequence_ids=seq_ids.to(TEST_DEVICE)))
            assert torch.equal(out.masked.cpu(), ref.masked)
            assert torch.equal(out.noisy_ids.cpu(), ref.noisy_ids)
            assert torch.equal(out.elbo_weight.cpu(), ref.elbo_weight)


def test_reference_is_what_the_op_runs():
    ids, maskable = _batch()
    out = _draw(ids, maskable, backend="torch")
    ref = random_mask_torch(ids, maskable, torch.arange(6), MASK_ID, 11, 0, 4, "stratified", 1e-3, False, False)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize(
    "change,argument",
    [
        (dict(input_ids=torch.zeros(4, 5)), "input_ids"),
        (dict(input_ids=torch.zeros(4, dtype=torch.long)), "input_ids"),
        (dict(maskable=torch.ones(4, 6, dtype=torch.bool)), "maskable"),
        (dict(maskable=torch.ones(4, 5)), "maskable"),
        (dict(sample_index=4), "sample_index"),
        (dict(sample_index=-1), "sample_index"),
        (dict(num_samples=0), "num_samples"),
        (dict(scheme="uniform"), "scheme"),
        (dict(t_min=1.0), "t_min"),
        (dict(seed=2**63), "seed"),
        (dict(seed="7"), "seed"),
        (dict(mask_id=1.5), "mask_id"),
        (dict(sequence_ids=torch.tensor([0, 1, 2])), "sequence_ids"),
        (dict(sequence_ids=torch.tensor([0, 1, 2, -3])), "sequence_ids"),
        (dict(sequence_ids=torch.tensor([0, 1, 2, 2**31])), "sequence_ids"),
        (dict(backend="fortran"), "backend"),
    ],
)
def test_bad_input_names_the_argument(change, argument):
    args = dict(input_ids=torch.zeros(4, 5, dtype=torch.long), maskable=torch.ones(4, 5, dtype=torch.bool),
                mask_id=MASK_ID, seed=0, sample_index=0, num_samples=4)
    args.update(change)
    with pytest.raises(ValueError, match=argument):
        bgpo.random_mask(args.pop("input_ids"), args.pop("maskable"), **args)


def test_too_many_columns_is_an_error():
    with pytest.raises(ValueError, match="input_ids"):
        _draw(torch.zeros(1, 2**16 + 1, dtype=torch.long), torch.zeros(1, 2**16 + 1, dtype=torch.bool))
