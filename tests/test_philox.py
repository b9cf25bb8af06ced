"""Philox4x32-10 (bgpo.philox): known-answer vectors and bit-exactness with Triton's tl.randint/tl.rand."""
import pytest
import torch

from bgpo import philox

MASK = 0xFFFFFFFF


def test_known_answer_vectors():
    # Random123's kat_vectors for philox4x32_10.
    zero = philox.philox4x32(0, torch.tensor([0]), 0, 0, 0)
    assert [int(w) for w in zero] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = philox.philox4x32(-1, torch.tensor([MASK]), MASK, MASK, MASK)
    assert [int(w) for w in ones] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_seed_key_split():
    assert philox.seed_to_key(-1) == (MASK, MASK)
    assert philox.seed_to_key(2**63 - 1) == (MASK, 0x7FFFFFFF)
    assert philox.seed_to_key(0x1234567890ABCDEF) == (0x90ABCDEF, 0x12345678)
    with pytest.raises(ValueError, match="seed"):
        philox.seed_to_key(2**64)
    with pytest.raises(ValueError, match="seed"):
        philox.seed_to_key(1.5)


def test_rand_is_in_unit_interval_and_uniform():
    u = philox.rand(7, torch.arange(200_000, dtype=torch.int64))
    assert u.dtype == torch.float32
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    # The largest int32 maps just below 1: the scale is one ulp below 2**-31.
    assert philox.RAND_SCALE * (2**31 - 1) < 1.0


def test_int32_offsets_have_zero_high_counter():
    offsets = torch.tensor([0, 1, 2**31 - 1, -1], dtype=torch.int32)
    as_uint = torch.tensor([0, 1, 2**31 - 1, MASK], dtype=torch.int64)
    assert torch.equal(philox.randint(3, offsets), philox.philox4x32(3, as_uint, 0)[0])


@pytest.mark.parametrize("seed", [0, 1, -1, 2**63 - 1, -(2**63), 123456789, 2**40 + 17])
def test_matches_triton_bit_for_bit(seed, triton_draws):
    """Fails if the installed Triton's stream drifts from SPEC §5 (older releases differ)."""
    g = torch.Generator().manual_seed(seed & 0xFFFF)
    offsets = torch.cat([
        torch.arange(4096, dtype=torch.int64),
        torch.randint(0, 2**62, (4096,), generator=g),
        (torch.arange(64, dtype=torch.int64) << 32) + 2**31 + 5,  # sequence-level draws above 2**32
    ])
    words, uniforms = triton_draws(seed, offsets)
    assert torch.equal(philox.randint(seed, offsets), words)
    assert torch.equal(philox.rand(seed, offsets), uniforms)
