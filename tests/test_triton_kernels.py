"""The Triton backend (``bgpo_kernels``): masking bit-exact with the torch path, the fused linear masked
cross-entropy against the full-logits reference, and its PyTorch integration (opcheck, torch.compile,
fake tensors, the error without a GPU or the interpreter).

On a CPU these run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py before triton
is imported); with a GPU and the interpreter off they run the compiled kernels on CUDA tensors.
Shapes are small: the interpreter executes each program in Python.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import bgpo  # noqa: E402
import bgpo_kernels  # noqa: E402
from bgpo.backends import registered_backends, resolve_backend  # noqa: E402
from bgpo.ops.random_mask import random_mask_torch, stratified_mask_counts  # noqa: E402
from bgpo.reference import fused_elbo_loss_reference, fused_elbo_reference  # noqa: E402
from bgpo_kernels import fused_elbo_loss as fel  # noqa: E402
from bgpo_kernels.random_mask import random_mask_forward  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
MASK_ID = 126336


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def test_triton_backend_is_registered_for_both_ops():
    assert "triton" in registered_backends("random_mask")
    assert "triton" in registered_backends("fused_elbo_loss")
    assert bgpo_kernels.available(torch.device("cuda")) is None
    assert (bgpo_kernels.available(torch.device("cpu")) is None) == INTERPRET
    assert "TRITON_INTERPRET" in bgpo_kernels.available(torch.device("meta"))


def test_auto_never_picks_triton_for_cpu_tensors():
    assert resolve_backend("fused_elbo_loss", "auto", torch.device("cpu")).name != "triton"
    assert resolve_backend("random_mask", "auto", torch.device("cpu")).name != "triton"


# ----------------------------------------------------------------------------------------------
# Masking kernel: bit-identical to the torch path
# ----------------------------------------------------------------------------------------------

SEEDS = [0, 1, 7, -5, 2**31 - 1, 2**31, 2**40 + 12345, -(2**50) - 3]


def _mask_batch(gen: torch.Generator, B: int, C: int):
    """Sequences of many lengths: a prompt prefix and padding suffix are not maskable; one row is empty,
    one has a single maskable position, one is fully maskable."""
    ids = torch.randint(0, 126000, (B, C), generator=gen)
    start = torch.randint(0, C, (B,), generator=gen)
    length = torch.randint(0, C + 1, (B,), generator=gen)
    col = torch.arange(C)
    maskable = (col >= start[:, None]) & (col < (start + length).clamp_max(C)[:, None])
    maskable[0] = False
    if B > 1:
        maskable[1] = False
        maskable[1, C // 2] = True
    if B > 2:
        maskable[2] = True
    sequence_ids = torch.randint(0, 2**31, (B,), generator=gen)
    sequence_ids[-1] = 2**31 - 1
    return ids.to(DEVICE), maskable.to(DEVICE), sequence_ids.to(DEVICE)


def _assert_same_mask(args, **launch):
    expected = random_mask_torch(*args)
    got = random_mask_forward(*args, **launch)
    for name, e, g in zip(("noisy_ids", "masked", "elbo_weight"), expected, got):
        assert e.dtype == g.dtype and e.shape == g.shape, name
        assert torch.equal(e, g), f"{name} differs: args={args[4:]}"


VARIANTS = [
    ("stratified", False, False),
    ("stratified", False, True),
    ("bernoulli", False, False),
    ("bernoulli", True, False),
    ("bernoulli", True, True),
]


@pytest.mark.parametrize("scheme,stratify_t,length_normalize", VARIANTS)
def test_random_mask_kernel_bit_exact_over_seeds(scheme, stratify_t, length_normalize):
    gen = torch.Generator().manual_seed(1000 + VARIANTS.index((scheme, stratify_t, length_normalize)))
    for k in range(2 * len(SEEDS)):  # each seed twice, on different lengths, sample indices and n_t
        seed = SEEDS[k % len(SEEDS)]
        C = int(torch.randint(1, 130, (1,), generator=gen))
        ids, maskable, sequence_ids = _mask_batch(gen, 8, C)
        n = int(torch.randint(1, 33, (1,), generator=gen))
        j = int(torch.randint(0, n, (1,), generator=gen))
        t_min = (0.0, 1e-3, 0.4)[k % 3]
        _assert_same_mask((ids, maskable, sequence_ids, MASK_ID, seed, j, n, scheme, t_min, stratify_t,
                           length_normalize))


@pytest.mark.parametrize("scheme", ["stratified", "bernoulli"])
def test_random_mask_kernel_bit_exact_every_sample_index(scheme):
    gen = torch.Generator().manual_seed(11)
    ids, maskable, sequence_ids = _mask_batch(gen, 5, 37)
    n = 6
    for j in range(n):
        args = (ids, maskable, sequence_ids, MASK_ID, 2024, j, n, scheme, 1e-3, scheme == "bernoulli", False)
        _assert_same_mask(args)
        if scheme == "stratified":  # exactly l_j positions
            counts = stratified_mask_counts(2024, sequence_ids, maskable.sum(dim=1), j, n)
            assert torch.equal(random_mask_forward(*args)[1].sum(dim=1), counts)


@pytest.mark.parametrize("scheme", ["stratified", "bernoulli"])
def test_random_mask_kernel_tiled_rows(scheme):
    """Rows longer than one block (the keys are recomputed tile by tile in the radix select)."""
    gen = torch.Generator().manual_seed(5)
    for seed, C in ((3, 41), (-(2**33), 64)):
        ids, maskable, sequence_ids = _mask_batch(gen, 3, C)
        args = (ids, maskable, sequence_ids, MASK_ID, seed, 2, 5, scheme, 1e-3, False, False)
        _assert_same_mask(args, block_c=16)


def test_random_mask_kernel_ties_go_to_lower_column():
    """Keys are (draw, column): with every column maskable the selection matches the sort exactly,
    including long rows where 32-bit draws are more likely to collide."""
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 100, (2, 200), generator=gen).to(DEVICE)
    maskable = torch.ones(2, 200, dtype=torch.bool, device=DEVICE)
    for j in (0, 3):
        _assert_same_mask((ids, maskable, torch.tensor([0, 2**31 - 1], device=DEVICE), MASK_ID, 1, j, 4,
                           "stratified", 1e-3, False, False))


def test_random_mask_kernel_unusual_strides():
    """Every pointer argument with unusual strides: transposed ids and mask, expanded sequence ids."""
    gen = torch.Generator().manual_seed(4)
    C, B = 29, 3
    ids = torch.randint(0, 1000, (C, B), generator=gen).to(DEVICE).t()
    maskable = (torch.rand(C, B, generator=gen) < 0.8).to(DEVICE).t()
    sequence_ids = torch.tensor([77], device=DEVICE).expand(B)
    for scheme in ("stratified", "bernoulli"):
        args = (ids, maskable, sequence_ids, MASK_ID, -9, 1, 3, scheme, 1e-3, False, True)
        _assert_same_mask(args)
        contiguous = (ids.contiguous(), maskable.contiguous(), sequence_ids.contiguous(), *args[3:])
        for a, b in zip(random_mask_forward(*args), random_mask_forward(*contiguous)):
            assert torch.equal(a, b)


def test_random_mask_public_op_triton_backend():
    gen = torch.Generator().manual_seed(1)
    ids, maskable, sequence_ids = _mask_batch(gen, 4, 23)
    ids32 = ids.to(torch.int32)
    for scheme in ("stratified", "bernoulli"):
        kwargs = dict(mask_id=MASK_ID, seed=99, sample_index=1, num_samples=3, sequence_ids=sequence_ids,
                      scheme=scheme)
        ref = bgpo.random_mask(ids32, maskable, backend="torch", **kwargs)
        got = bgpo.random_mask(ids32, maskable, backend="triton", **kwargs)
        assert got.noisy_ids.dtype == torch.int32
        for e, g in zip(ref, got):
            assert torch.equal(e, g)
    # A non-contiguous id tensor and the default sequence ids.
    wide = torch.randint(0, 50, (4, 46), generator=gen).to(DEVICE)[:, ::2]
    ref = bgpo.random_mask(wide, maskable, mask_id=7, seed=5, sample_index=0, num_samples=2, backend="torch")
    got = bgpo.random_mask(wide, maskable, mask_id=7, seed=5, sample_index=0, num_samples=2, backend="triton")
    for e, g in zip(ref, got):
        assert torch.equal(e, g)


# ----------------------------------------------------------------------------------------------
# Fused linear masked cross-entropy
# ----------------------------------------------------------------------------------------------


def _elbo_inputs(B, L, H, V, dtype, *, bias=False, seed=0, mask_rate=0.5):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (2.0 / H**0.5)
    b = torch.randn(V, generator=gen) if bias else None
    targets = torch.randint(0, V, (B, L), generator=gen)
    masked = torch.rand(B, L, generator=gen) < mask_rate
    masked[0] = False  # a sequence with nothing masked
    if B > 1:
        masked[1, 0] = True
    elbo_weight = torch.rand(B, generator=gen) * 4.0 + 0.25  # non-uniform per-sequence weights
    advantages = torch.randn(B, generator=gen)
    advantages[1::2] = -advantages[1::2].abs()  # both signs
    advantages[::2] = advantages[::2].abs()
    if B > 3:
        advantages[3] = 0.0  # a sequence whose rows carry no gradient
    cast = dict(device=DEVICE, dtype=dtype)
    return dict(
        hidden=hidden.to(**cast), weight=weight.to(**cast), bias=None if b is None else b.to(**cast),
        targets=targets.to(DEVICE), masked=masked.to(DEVICE), elbo_weight=elbo_weight.to(DEVICE),
        advantages=advantages.to(DEVICE),
    )


def _run(inputs, backend, *, dtype=None, softcap=None, old_shift=None, objective="bgpo", num_samples=3,
         grads=("hidden", "weight", "bias")):
    """Loss, ℓ and the gradients of the differentiable inputs, for one backend (or the reference)."""
    leaves = {}
    for name in ("hidden", "weight", "bias"):
        x = inputs[name]
        if x is None:
            continue
        x = x.detach().to(dtype or x.dtype)
        leaves[name] = x.requires_grad_(name in grads)
    bias = leaves.get("bias")
    old = None
    if old_shift is not None:
        with torch.no_grad():
            base = fused_elbo_reference(inputs["hidden"].float(), inputs["weight"].float(), inputs["targets"],
                                        inputs["masked"], inputs["elbo_weight"],
                                        bias=None if inputs["bias"] is None else inputs["bias"].float(),
                                        softcap=softcap)
        old = base + old_shift
    common = dict(num_samples=num_samples, bias=bias, softcap=softcap, objective=objective, denom=7.0)
    args = (leaves["hidden"], leaves["weight"], inputs["targets"], inputs["masked"], inputs["elbo_weight"],
            inputs["advantages"], old)
    if backend == "reference":
        out = fused_elbo_loss_reference(*args, **common)
    else:
        out = bgpo.fused_elbo_loss(*args, backend=backend, **common)
    out.loss.backward()
    result = {"loss": out.loss.detach().float(), "elbo": out.elbo.float()}
    for name, x in leaves.items():
        if x.requires_grad:
            result["grad_" + name] = x.grad.float()
    return result


def _check_fp32(got, want, rtol=2e-4):
    assert got.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max().item() + 1e-6
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=rtol * scale, msg=key)


def _check_low_precision(got, ref_low, ref32, factor=4.0):
    """SPEC rule: the backend's error vs the fp32 reference is at most a small multiple of the error of
    the reference computed in the same dtype (plus a tiny absolute slack)."""
    for key in ref32:
        scale = ref32[key].abs().max().item() + 1e-6
        err = (got[key] - ref32[key]).abs().max().item()
        ref_err = (ref_low[key] - ref32[key]).abs().max().item()
        assert err <= factor * ref_err + 1e-3 * scale, f"{key}: error {err:.3g} vs reference's {ref_err:.3g}"


FP32_CASES = [
    # B, L, H, V, bias, softcap
    pytest.param(4, 6, 32, 96, True, None, id="even-tiles-bias"),
    pytest.param(4, 6, 40, 100, False, None, id="V-and-H-not-multiples"),
    pytest.param(3, 5, 24, 77, True, 4.0, id="softcap-bias"),
    pytest.param(5, 4, 16, 33, False, 2.5, id="softcap-small-V"),
]


@pytest.mark.parametrize("B,L,H,V,bias,softcap", FP32_CASES)
@pytest.mark.parametrize("old_shift", [None, 0.3], ids=["on-policy", "off-policy"])
def test_fused_elbo_loss_fp32_matches_reference(B, L, H, V, bias, softcap, old_shift):
    inputs = _elbo_inputs(B, L, H, V, torch.float32, bias=bias, seed=B * 100 + V)
    want = _run(inputs, "reference", softcap=softcap, old_shift=old_shift)
    got = _run(inputs, "triton", softcap=softcap, old_shift=old_shift)
    _check_fp32(got, want)
    assert torch.all(got["grad_hidden"][0] == 0)  # nothing masked in sequence 0
    if B > 3:
        assert torch.all(got["grad_hidden"][3] == 0)  # A = 0: no gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (True, 3.0), (False, 6.0)],
                         ids=["plain", "bias", "bias-softcap", "softcap"])
def test_fused_elbo_loss_low_precision(dtype, bias, softcap):
    inputs = _elbo_inputs(4, 6, 48, 100, dtype, bias=bias, seed=17)
    ref32 = _run(inputs, "reference", dtype=torch.float32, softcap=softcap, old_shift=-0.2)
    ref_low = _run(inputs, "reference", softcap=softcap, old_shift=-0.2)
    got = _run(inputs, "triton", softcap=softcap, old_shift=-0.2)
    _check_low_precision(got, ref_low, ref32)


def test_fused_elbo_loss_objective_elbo_and_partial_grads():
    inputs = _elbo_inputs(4, 5, 32, 70, torch.float32, bias=True, seed=3)
    _check_fp32(_run(inputs, "triton", objective="elbo"), _run(inputs, "reference", objective="elbo"))
    for grads in (("hidden",), ("weight",), ("bias",), ("weight", "bias")):
        _check_fp32(_run(inputs, "triton", grads=grads), _run(inputs, "reference", grads=grads))


def test_fused_elbo_per_row_coefficient_non_uniform():
    """Arbitrary per-sequence upstream gradients and weights: the classic one-scalar-for-all-rows bug fails."""
    inputs = _elbo_inputs(5, 6, 32, 50, torch.float32, bias=True, seed=8, mask_rate=0.7)
    upstream = torch.tensor([0.5, -2.0, 3.0, 0.0, -0.25], device=DEVICE)
    results = []
    for backend in ("reference", "triton"):
        h = inputs["hidden"].clone().requires_grad_()
        w = inputs["weight"].clone().requires_grad_()
        b = inputs["bias"].clone().requires_grad_()
        args = (h, w, inputs["targets"], inputs["masked"], inputs["elbo_weight"])
        if backend == "reference":
            elbo = fused_elbo_reference(*args, bias=b)
        else:
            elbo = bgpo.fused_elbo(*args, bias=b, backend="triton")
        grads = torch.autograd.grad(elbo, (h, w, b), upstream)
        results.append({"elbo": elbo.detach(), "h": grads[0], "w": grads[1], "b": grads[2]})
    _check_fp32(results[1], results[0])


def test_fused_elbo_loss_nothing_masked():
    inputs = _elbo_inputs(3, 4, 16, 40, torch.float32, bias=True)
    inputs["masked"] = torch.zeros_like(inputs["masked"])
    got = _run(inputs, "triton")
    assert torch.all(got["elbo"] == 0)
    torch.testing.assert_close(got["loss"], _run(inputs, "reference")["loss"])  # on-policy: the value is Σ A / (n D)
    for key in ("grad_hidden", "grad_weight", "grad_bias"):
        assert torch.all(got[key] == 0)


def test_fused_elbo_loss_large_hidden():
    """H = 8192 (the issue's upper end), a few rows."""
    inputs = _elbo_inputs(2, 2, 8192, 24, torch.bfloat16, bias=False, seed=4, mask_rate=1.0)
    ref32 = _run(inputs, "reference", dtype=torch.float32)
    ref_low = _run(inputs, "reference")
    got = _run(inputs, "triton")
    _check_low_precision(got, ref_low, ref32)


def test_fused_elbo_forward_vocab_splits_and_determinism():
    """The forward's vocabulary split (several splits, one not a multiple of the tile) changes nothing
    beyond rounding, and the forward is bitwise deterministic."""
    inputs = _elbo_inputs(4, 6, 32, 130, torch.float32, bias=True, seed=21)
    args = (inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], inputs["masked"],
            inputs["elbo_weight"], 5.0, 0)
    one_elbo, one_lse = fel.fused_elbo_loss_forward(*args)
    for split in (40, 64, 129):
        elbo, lse = fel.fused_elbo_loss_forward(*args, v_split=split)
        torch.testing.assert_close(elbo, one_elbo, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, one_lse, rtol=1e-6, atol=1e-5)
    first, second = (fel.fused_elbo_loss_forward(*args, v_split=40) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    ref = fused_elbo_reference(inputs["hidden"], inputs["weight"], inputs["targets"], inputs["masked"],
                               inputs["elbo_weight"], bias=inputs["bias"], softcap=5.0)
    torch.testing.assert_close(one_elbo, ref, rtol=1e-5, atol=1e-4)
    assert torch.all(one_lse[~inputs["masked"]] == 0)


def test_fused_elbo_loss_non_contiguous_hidden():
    inputs = _elbo_inputs(3, 8, 32, 50, torch.float32, seed=2)
    wide = torch.randn(3, 16, 32, device=DEVICE)
    inputs["hidden"] = wide[:, ::2]  # strided rows: gathered through the row stride, no copy
    assert not inputs["hidden"].is_contiguous()
    _check_fp32(_run(inputs, "triton"), _run(inputs, "reference"))


@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_fused_elbo_non_contiguous_elbo_weight(kind):
    """Regression: the reduce kernel read ``elbo_weight_ptr + b`` whatever the strides (ℓ off by tens of
    nats for a strided weight, zeros for an expanded one; out-of-bounds reads on a GPU)."""
    inputs = _elbo_inputs(4, 6, 32, 50, torch.float32, bias=True, seed=31)
    if kind == "strided":
        inputs["elbo_weight"] = (torch.rand(8, device=DEVICE) + 0.5)[::2]
    else:
        inputs["elbo_weight"] = torch.tensor([1.5], device=DEVICE).expand(4)
    assert not inputs["elbo_weight"].is_contiguous()
    _check_fp32(_run(inputs, "triton"), _run(inputs, "reference"))


def test_fused_elbo_strided_and_transposed_inputs():
    """Every tensor argument with unusual strides: a one-sequence batch whose targets/mask rows have stride 2
    (they flatten to a strided view), hidden transposed from (L, B, H), a column-major W, a strided bias."""
    gen = torch.Generator().manual_seed(13)
    B, L, H, V = 1, 7, 24, 45
    targets = torch.randint(0, V, (B, 2 * L), generator=gen).to(DEVICE)[:, ::2]
    masked = (torch.rand(B, 2 * L, generator=gen) < 0.7).to(DEVICE)[:, ::2]
    inputs = dict(
        hidden=torch.randn(L, B, H, generator=gen).to(DEVICE).transpose(0, 1),
        weight=(torch.randn(H, V, generator=gen) * 0.3).to(DEVICE).t(),
        bias=torch.randn(2 * V, generator=gen).to(DEVICE)[::2],
        targets=targets, masked=masked, elbo_weight=torch.full((B,), 2.0, device=DEVICE),
        advantages=torch.ones(B, device=DEVICE),
    )
    assert targets.reshape(-1).stride(0) == 2 and inputs["weight"].stride(1) != 1
    _check_fp32(_run(inputs, "triton"), _run(inputs, "reference"))
    inputs["hidden"] = torch.randn(1, H, generator=gen).to(DEVICE).expand(B, L, H)  # zero strides
    _check_fp32(_run(inputs, "triton"), _run(inputs, "reference"))


def test_fused_elbo_out_of_range_target_is_nan_not_garbage():
    """Regression: with the host checks skipped (the raw custom op, as under torch.compile), a target outside
    [0, V) left ℓ reading uninitialised memory; now ℓ and the row's gradients are NaN, other sequences exact."""
    inputs = _elbo_inputs(3, 5, 16, 40, torch.float32, bias=True, seed=41, mask_rate=1.0)
    targets = inputs["targets"].clone()
    targets[1, 2], targets[2, 0] = 40, -3
    args = (inputs["hidden"], inputs["weight"], inputs["bias"], targets, inputs["masked"], inputs["elbo_weight"])
    elbo, lse = torch.ops.bgpo.fused_elbo_loss_fwd(*args, None, "triton", 0)
    assert torch.isnan(elbo[1:]).all() and torch.isfinite(elbo[0])
    want = fused_elbo_reference(inputs["hidden"][:1], inputs["weight"], inputs["targets"][:1], inputs["masked"][:1],
                                inputs["elbo_weight"][:1], bias=inputs["bias"])
    torch.testing.assert_close(elbo[:1], want, rtol=1e-5, atol=1e-5)
    grad_h, grad_w, grad_b = torch.ops.bgpo.fused_elbo_loss_bwd(torch.tensor([1.0, 0.0, 1.0], device=DEVICE), *args,
                                                                lse, None, "triton", 0, True, True, True)
    assert torch.isnan(grad_h[2, 0]).all() and torch.isfinite(grad_h[:2]).all()  # sequence 1: no gradient asked
    assert torch.isnan(grad_w).any() and torch.isnan(grad_b).any()


def _raw_backward(inputs, softcap=None, **launch):
    lse = fel.fused_elbo_loss_forward(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"],
                                      inputs["masked"], inputs["elbo_weight"], softcap, 0)[1]
    grad = torch.linspace(-2.0, 3.0, inputs["hidden"].shape[0], device=DEVICE)
    return fel.fused_elbo_loss_backward(grad, inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"],
                                        inputs["masked"], inputs["elbo_weight"], lse, softcap, 0, True, True,
                                        inputs["bias"] is not None, **launch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_elbo_backward_chunks_and_determinism(dtype):
    """The vocabulary chunks of the backward (several, the last one partial) change nothing beyond rounding,
    and two identical calls give bit-identical gradients (no atomics, fixed summation orders)."""
    inputs = _elbo_inputs(4, 6, 40, 100, dtype, bias=True, seed=23, mask_rate=0.8)
    whole = _raw_backward(inputs, softcap=5.0)
    for chunk in (32, 48, 99):
        chunked = _raw_backward(inputs, softcap=5.0, v_chunk=chunk)
        for a, b in zip(whole, chunked):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    first, again = (_raw_backward(inputs, softcap=5.0, v_chunk=48) for _ in range(2))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert fel._dz_chunk(32, 16384) == 16384 and fel._dz_chunk(2048, 126464) == 8192
    assert fel._dz_chunk(16384, 126464) == 1024 and fel._dz_chunk(10**6, 126464) == 256


def _peaked_inputs(dtype, *, B=2, L=24, H=64, V=512, seed=0):
    """As ``benchmarks/fused_elbo_loss.py --peaked``: each row's hidden state is its target's row of W scaled
    by s plus noise, so its softmax is peaked on the target (a uniform one flatters filtering).  s ~ U(15, 25),
    not the benchmark's U(5, 25): at these toy shapes a row with s < 10 is flat enough (max p < 0.8) that no
    16-row tile containing it can be filtered, and nothing would be tested."""
    inputs = _elbo_inputs(B, L, H, V, torch.float32, bias=True, seed=seed, mask_rate=0.8)
    gen = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(V, H, generator=gen) * H**-0.5
    scale = torch.rand(B, L, 1, generator=gen) * 10.0 + 15.0
    hidden = weight[inputs["targets"].cpu()] * scale + torch.randn(B, L, H, generator=gen) * H**-0.5
    bias = inputs["bias"] * 0.1  # a small bias: N(0, 1) would flatten the toy softmax
    inputs.update(hidden=hidden.to(DEVICE, dtype), weight=weight.to(DEVICE, dtype), bias=bias.to(dtype))
    return inputs


def _filtered_reference(inputs, eps, cell_n, cell_v):
    """The filtered gradients in PyTorch (fp32): dz of the compacted rows zeroed on every (cell_n x cell_v) cell
    whose softmax is < eps everywhere and that holds no row's target; grad h = dz W, grad W = dzᵀ h, grad b."""
    h32, w32, b32 = (inputs[k].float() for k in ("hidden", "weight", "bias"))
    B, L, H = h32.shape
    V = w32.shape[0]
    coef = torch.linspace(-2.0, 3.0, B, device=DEVICE) * inputs["elbo_weight"].float()  # as _raw_backward
    rows = (inputs["masked"] & (coef != 0)[:, None]).reshape(-1).nonzero().squeeze(1)
    h, y = h32.reshape(-1, H)[rows], inputs["targets"].reshape(-1)[rows]
    prob = torch.softmax(h @ w32.T + b32, dim=1)
    onehot = torch.nn.functional.one_hot(y, V).float()
    dz = coef[rows // L, None] * (onehot - prob)
    N = rows.numel()
    for n0 in range(0, N, cell_n):
        for c0 in range(0, V, cell_v):
            cell = (slice(n0, n0 + cell_n), slice(c0, c0 + cell_v))
            if bool((prob[cell] < eps).all()) and not bool(onehot[cell].any()):
                dz[cell] = 0.0
    grad_h = torch.zeros(B * L, H, device=DEVICE)
    grad_h[rows] = dz @ w32
    return grad_h.view(B, L, H), dz.T @ h, dz.sum(dim=0)


def _tile(n, v, h=32):
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_H": h}, num_warps=4, num_stages=1)]


@pytest.mark.parametrize("grad_tiles", ["same", "coarser", "finer"])
def test_grad_filter_is_the_gradient_of_the_zeroed_cells(monkeypatch, grad_tiles):
    """eps > 0 on peaked logits: the gradients are exactly (to fp32 rounding) those of dz zeroed on the dz kernel's
    skipped (row tile, vocabulary block) cells, whether the grad-W/grad-h steps match the cells, span several of
    them or lie inside one; they differ from the exact ones, by at most the bound of the dropped mass; and the
    filtered backward is deterministic."""
    monkeypatch.setattr(fel._dz_kernel, "configs", _tile(16, 32))
    consumer = {"same": _tile(16, 32), "coarser": _tile(32, 64), "finer": _tile(16, 16, 16)}[grad_tiles]
    monkeypatch.setattr(fel._grad_w_kernel, "configs", consumer)
    monkeypatch.setattr(fel._grad_h_kernel, "configs", consumer)
    inputs = _peaked_inputs(torch.float32)
    eps = 2.0**-12
    exact = _raw_backward(inputs)
    filtered = _raw_backward(inputs, grad_filter_eps=eps)
    for name, got, want, full in zip(("h", "W", "bias"), filtered, _filtered_reference(inputs, eps, 16, 32), exact):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale, msg=name)
        assert (got - full).abs().max() > 1e-3 * scale, f"grad {name}: nothing was filtered"
    # each dropped entry has |dz| < |coef|·eps: |Δ grad W[v]| <= eps Σ_r |coef_r| |h_r|
    coef = (torch.linspace(-2.0, 3.0, 2, device=DEVICE) * inputs["elbo_weight"])[:, None, None].abs()
    bound = eps * (coef * inputs["hidden"].abs() * inputs["masked"][..., None]).sum(dim=(0, 1))
    assert torch.all((filtered[1] - exact[1]).abs() <= bound[None, :] * (1 + 1e-4) + 1e-7)
    again = _raw_backward(inputs, grad_filter_eps=eps)
    assert all(torch.equal(a, b) for a, b in zip(filtered, again))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grad_filter_error_on_peaked_logits(dtype):
    """The measured error of CCE's bf16 threshold 2**-12 against the exact path, next to the exact bf16 path's own
    rounding error against fp32 (README quotes the printout)."""
    inputs = _peaked_inputs(dtype, B=3, L=16, V=1024)
    exact = _raw_backward(inputs)
    exact32 = _raw_backward({k: v.float() if k in ("hidden", "weight", "bias") else v for k, v in inputs.items()})
    filtered = _raw_backward(inputs, grad_filter_eps=2.0**-12)

    def relative(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()
    names = ("grad_h", "grad_W", "grad_bias")
    errors = {name: relative(f, e) for name, f, e in zip(names, filtered, exact)}
    rounding = {name: relative(e, e32) for name, e, e32 in zip(names, exact, exact32)}
    print(f"\n{dtype}, grad_filter_eps=2**-12, peaked logits: relative error (Frobenius) vs the exact path: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
          + "; exact path vs fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in rounding.items()))
    assert 0 < max(errors.values()) < 1e-2, errors
    if dtype == torch.bfloat16:  # filtering costs no more than bf16 rounding itself (README)
        assert all(errors[k] <= 1.5 * rounding[k] for k in names), (errors, rounding)


def test_grad_filter_skips_nothing_on_a_uniform_softmax():
    """Near-uniform softmax (p ≈ 1/V ≫ eps): nothing is skipped, the gradients are bit-identical to the exact path."""
    inputs = _elbo_inputs(3, 6, 32, 100, torch.float32, bias=True, seed=9, mask_rate=0.9)
    inputs["weight"] = inputs["weight"] * 1e-3
    exact = _raw_backward(inputs, softcap=5.0)
    filtered = _raw_backward(inputs, softcap=5.0, grad_filter_eps=2.0**-12)
    assert all(torch.equal(a, b) for a, b in zip(exact, filtered))


def test_grad_filter_through_the_public_op():
    """grad_filter_eps reaches the Triton backward through fused_elbo's autograd (the launcher's filtered gradients,
    bit for bit); other backends and thresholds outside (0, 1) are a ValueError naming the argument."""
    inputs = _peaked_inputs(torch.float32)
    leaves = [inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    elbo = bgpo.fused_elbo(leaves[0], leaves[1], inputs["targets"], inputs["masked"], inputs["elbo_weight"],
                           bias=leaves[2], backend="triton", grad_filter_eps=2.0**-12)
    upstream = torch.linspace(-2.0, 3.0, elbo.shape[0], device=DEVICE)  # as _raw_backward
    got = torch.autograd.grad(elbo, leaves, upstream)
    want = _raw_backward(inputs, grad_filter_eps=2.0**-12)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert not torch.equal(want[1], _raw_backward(inputs)[1])
    # an out-of-range target (host checks skipped: the raw op) still makes its row's gradients NaN when filtering
    targets = inputs["targets"].clone()
    targets[1, 0] = -1
    raw = (inputs["hidden"], inputs["weight"], inputs["bias"], targets, inputs["masked"], inputs["elbo_weight"])
    _, lse = torch.ops.bgpo.fused_elbo_loss_fwd(*raw, None, "triton", 0)
    grad_h, grad_w, _ = torch.ops.bgpo.fused_elbo_loss_bwd(upstream, *raw, lse, None, "triton", 0, True, True, True,
                                                           2.0**-12)
    assert torch.isnan(grad_h[1, 0]).all() and torch.isfinite(grad_h[1, 1:]).all() and torch.isnan(grad_w).any()
    args = (inputs["hidden"], inputs["weight"], inputs["targets"], inputs["masked"], inputs["elbo_weight"])
    with pytest.raises(ValueError, match="grad_filter_eps.*'triton' backend only"):
        bgpo.fused_elbo(*args, backend="torch", grad_filter_eps=2.0**-12)
    for bad in (0.0, 1.0, -1e-3, float("nan"), True, "1e-3"):
        with pytest.raises(ValueError, match="grad_filter_eps"):
            bgpo.fused_elbo(*args, backend="triton", grad_filter_eps=bad)


def test_fused_elbo_backward_memory_has_no_fp32_vocab_buffer(monkeypatch):
    """The issue's target: bf16, V = 16384, H = 256, 32 masked rows -- one backward peaks at most 1.5x the bf16
    grad W it returns (the old kernel: 3.0x, an fp32 (V, H) accumulator plus its copy), measured from the CPU
    allocator's events, and within the declared workspace plus the outputs."""
    from bgpo.memory import track_peak_memory

    big = [triton.Config({"BLOCK_N": 32, "BLOCK_V": 512, "BLOCK_H": 256}, num_warps=4, num_stages=1)]
    for kernel in (fel._fwd_kernel, fel._dz_kernel, fel._grad_w_kernel, fel._grad_h_kernel):
        monkeypatch.setattr(kernel, "configs", big)  # larger interpreter tiles: the same code, fewer programs
    gen = torch.Generator().manual_seed(0)
    B, L, H, V = 2, 32, 256, 16384
    hidden = torch.randn(B, L, H, generator=gen).to(DEVICE, torch.bfloat16)
    weight = (torch.randn(V, H, generator=gen) * H**-0.5).to(DEVICE, torch.bfloat16)
    targets = torch.randint(0, V, (B, L), generator=gen).to(DEVICE)
    masked = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    masked[:, ::2] = True
    elbo_weight = torch.ones(B, device=DEVICE)
    args = (hidden, weight, None, targets, masked, elbo_weight, None, 0)
    with track_peak_memory(DEVICE) as fwd:
        _, lse = fel.fused_elbo_loss_forward(*args)
    assert fwd.peak_bytes <= fel.workspace_bytes("forward", hidden, weight, 0) + B * L * 4 + B * 4 + 4096
    grad_w_bytes = V * H * 2
    with track_peak_memory(DEVICE) as bwd:
        outs = fel.fused_elbo_loss_backward(torch.tensor([1.0, -0.5], device=DEVICE), *args[:6], lse, None, 0,
                                            True, True, False)
    print(f"backward peak {bwd.peak_bytes / grad_w_bytes:.3f}x the bf16 grad W ({grad_w_bytes} B); "
          f"forward peak {fwd.peak_bytes} B")
    assert bwd.peak_bytes <= 1.5 * grad_w_bytes, bwd.peak_bytes / grad_w_bytes
    outputs = sum(t.numel() * t.element_size() for t in outs)
    assert bwd.peak_bytes <= fel.workspace_bytes("backward", hidden, weight, 0, True) + outputs + 4096


# ----------------------------------------------------------------------------------------------
# PyTorch integration: opcheck, torch.compile, fake tensors
# ----------------------------------------------------------------------------------------------


def _op_args(softcap=None, bias=True):
    inputs = _elbo_inputs(2, 4, 16, 40, torch.float32, bias=bias, seed=6)
    h = inputs["hidden"].requires_grad_()
    w = inputs["weight"].requires_grad_()
    b = inputs["bias"].requires_grad_() if bias else None
    return inputs, (h, w, b, inputs["targets"], inputs["masked"], inputs["elbo_weight"], softcap, "triton", 0)


@pytest.mark.parametrize("softcap,bias", [(None, True), (3.0, False)])
def test_opcheck_fused_elbo_ops(softcap, bias):
    inputs, args = _op_args(softcap, bias)
    torch.library.opcheck(torch.ops.bgpo.fused_elbo_loss_fwd.default, args)
    elbo, lse = torch.ops.bgpo.fused_elbo_loss_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    grad = torch.randn(2, device=DEVICE)
    bwd_args = (grad, args[0].detach(), args[1].detach(), None if args[2] is None else args[2].detach(),
                args[3], args[4], args[5], lse, softcap, "triton", 0, True, True, bias)
    torch.library.opcheck(torch.ops.bgpo.fused_elbo_loss_bwd.default, bwd_args)


def test_opcheck_random_mask():
    gen = torch.Generator().manual_seed(2)
    ids, maskable, sequence_ids = _mask_batch(gen, 3, 12)
    for scheme in ("stratified", "bernoulli"):
        torch.library.opcheck(torch.ops.bgpo.random_mask.default,
                              (ids, maskable, sequence_ids, MASK_ID, 5, 1, 4, scheme, 1e-3, False, False, "triton"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    inputs = _elbo_inputs(3, 5, 16, 40, torch.float32, bias=True, seed=12)

    def step(input_ids, maskable, hidden, weight, bias, advantages):
        sample = bgpo.random_mask(input_ids, maskable, mask_id=MASK_ID, seed=3, sample_index=1, num_samples=2,
                                  backend="triton")
        out = bgpo.fused_elbo_loss(hidden, weight, input_ids, sample.masked, sample.elbo_weight, advantages,
                                   num_samples=2, bias=bias, softcap=8.0, backend="triton")
        return out.loss, out.elbo

    input_ids = inputs["targets"]
    maskable = torch.ones_like(inputs["masked"])
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        h = inputs["hidden"].clone().requires_grad_()
        w = inputs["weight"].clone().requires_grad_()
        b = inputs["bias"].clone().requires_grad_()
        loss, elbo = fn(input_ids, maskable, h, w, b, inputs["advantages"])
        loss.backward()
        results.append({"loss": loss.detach(), "elbo": elbo, "h": h.grad, "w": w.grad, "b": b.grad})
    _check_fp32(results[1], results[0], rtol=1e-5)


def test_fake_tensors_flow_at_llada_scale():
    """Fake tensors of LLaDA's LM head (V = 126464, H = 4096): shapes and dtypes flow through forward and
    backward without allocating anything (a later issue simulates an 8B model's memory this way)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, L, H, V = 8, 512, 4096, 126464
    with FakeTensorMode():
        hidden = torch.empty(B, L, H, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        weight = torch.empty(V, H, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        ids = torch.empty(B, L, dtype=torch.int64, device=DEVICE)
        sample = bgpo.random_mask(ids, torch.ones(B, L, dtype=torch.bool, device=DEVICE), mask_id=MASK_ID,
                                  seed=0, sample_index=0, num_samples=16, backend="triton")
        out = bgpo.fused_elbo_loss(hidden, weight, ids, sample.masked, sample.elbo_weight,
                                   torch.zeros(B, device=DEVICE), num_samples=16, backend="triton")
        out.loss.backward()
        assert hidden.grad.shape == (B, L, H) and hidden.grad.dtype == torch.bfloat16
        assert weight.grad.shape == (V, H) and weight.grad.dtype == torch.bfloat16
        assert out.elbo.shape == (B,) and out.elbo.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Autotune configurations and the error without the interpreter
# ----------------------------------------------------------------------------------------------


def test_autotune_configs_fit_the_gpus(monkeypatch):
    from bgpo_kernels import _configs

    # Operands pipelined per stage: fwd/dz (BN + BV) x BH, grad W BN x (BV + BH), grad h BV x (BN + BH).
    stage = {id(_configs.FWD): lambda n, v, h: (n + v) * h, id(_configs.DZ): lambda n, v, h: (n + v) * h,
             id(_configs.GRAD_W): lambda n, v, h: n * (v + h), id(_configs.GRAD_H): lambda n, v, h: v * (n + h)}
    tables = (_configs.FWD, _configs.DZ, _configs.GRAD_W, _configs.GRAD_H)
    for table in tables:
        for arch, smem in ((80, 164 * 1024), (90, 228 * 1024)):
            for size in (2, 4):
                for c in table.for_operands(arch, size):
                    n, v, h = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"]
                    assert all(x >= 16 and x & (x - 1) == 0 for x in (n, v, h))
                    assert c.num_stages * stage[id(table)](n, v, h) * size <= smem
    for c in _configs.FWD.everything():
        assert fel._SPLIT_QUANTUM % c.kwargs["BLOCK_V"] == 0

    def cuda_tensor(dtype):
        return type("T", (), {"device": torch.device("cuda", 0), "data_ptr": lambda self: 0,
                              "element_size": lambda self: dtype.itemsize})()

    for table in tables:
        prune = _configs.pruner(table)
        everything = table.everything()
        for major, arch in ((9, 90), (8, 80)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
            for dtype, listed in ((torch.bfloat16, table.half[arch]), (torch.float16, table.half[arch]),
                                  (torch.float32, table.fp32[arch])):
                args = {"N": 3, "h_ptr": cuda_tensor(dtype), "weight_ptr": cuda_tensor(torch.float32)}
                monkeypatch.delenv(_configs.AUTOTUNE_ENV, raising=False)
                assert prune(everything, args) == listed[:1]  # the fixed default of the rows' dtype
                monkeypatch.setenv(_configs.AUTOTUNE_ENV, "1")
                assert prune(everything, args) == listed  # tuning on request
    assert [_configs.n_bucket(n) for n in (0, 1, 3, 64, 65)] == [1, 1, 4, 64, 128]


def test_available_refuses_gpus_older_than_sm80(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    reason = bgpo_kernels.available(torch.device("cuda", 0))
    assert reason is not None and "8.0" in reason and "7.5" in reason and "Triton" in reason and "T4" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert bgpo_kernels.available(torch.device("cuda", 0)) is None


def test_pick_split_with_no_masked_rows(monkeypatch):
    """Regression: the vocabulary split divided by cdiv(N, 128) = 0 when nothing is masked (on CUDA)."""
    props = type("P", (), {"multi_processor_count": 132})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    cuda = torch.device("cuda", 0)
    assert fel._pick_split(0, 126464, cuda) == fel._pick_split(1, 126464, cuda)
    assert fel._pick_split(0, 1000, cuda) == 1000


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = """
import torch, bgpo
h = torch.randn(1, 3, 8); w = torch.randn(10, 8)
t = torch.zeros(1, 3, dtype=torch.long); m = torch.ones(1, 3, dtype=torch.bool)
for call in (
    lambda: bgpo.fused_elbo(h, w, t, m, torch.ones(1), backend="triton"),
    lambda: bgpo.random_mask(t, m, mask_id=1, seed=0, sample_index=0, num_samples=1, backend="triton"),
):
    try:
        call()
    except ValueError as e:
        assert "TRITON_INTERPRET=1" in str(e) and "CUDA" in str(e), e
    else:
        raise SystemExit("no error")
bgpo.fused_elbo(h, w, t, m, torch.ones(1), backend="auto")  # auto falls back to another backend
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_the_gpu_without_spills(arch, tmp_path):
    """Triton's real compiler (not the interpreter) on the CPU: every kernel compiles for sm_80/sm_90, the
    default tile of every dtype (bf16, fp16, fp32 with IEEE and with TF32 products, bf16 rows against an fp32 W)
    spills no register (sm_80's fp32 FMA path spilled 9-15 KB per thread with the bf16 tiles), and the masking
    kernel has no FMA (bit-exactness)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "bgpo_kernels._compile_check", "--arch", str(arch), "--first", "--strict"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_interpreter_refused_where_its_release_cannot_run(monkeypatch):
    """Triton 3.6's interpreter fails on every kernel under numpy >= 2.4 (int() of a one-element array):
    available() says so, naming both releases and the fix, instead of an error deep in the interpreter."""
    reason = bgpo_kernels.interpreter_reason("3.6.0", "2.4.6")
    assert "3.6.0" in reason and "2.4.6" in reason and "numpy<2.4" in reason and "triton>=3.8" in reason
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.8.0", "2.4.6"), ("3.8.1+git1a2b", "2.5.0rc1"),
                                          ("3.6.0", "1.26.4")):
        assert bgpo_kernels.interpreter_reason(triton_version, numpy_version) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bgpo_kernels, "_compiled_for_gpu", lambda: False)
    monkeypatch.setattr(bgpo_kernels, "interpreter_reason", lambda: "the interpreter cannot run")
    assert bgpo_kernels.available(torch.device("cpu")) == "the interpreter cannot run"
