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
    for sm80, sm90 in ((fel._FWD_SM80, fel._FWD_SM90), (fel._BWD_SM80, fel._BWD_SM90)):
        for configs, smem in ((sm80, 164 * 1024), (sm90, 228 * 1024)):
            for c in configs:
                n, v, h = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"]
                assert all(x >= 16 and x & (x - 1) == 0 for x in (n, v, h))
                assert fel._SPLIT_QUANTUM % v == 0
                assert c.num_stages * (n + v) * h * 2 <= smem  # bf16 operand pipeline
    fake_cuda = type("T", (), {"device": torch.device("cuda", 0)})()
    prune = fel._device_configs(fel._FWD_SM80, fel._FWD_SM90)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert prune(fel._FWD_SM80 + fel._FWD_SM90, {"hidden_ptr": fake_cuda}) == fel._FWD_SM90
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert prune(fel._FWD_SM80 + fel._FWD_SM90, {"hidden_ptr": fake_cuda}) == fel._FWD_SM80


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
    bf16/fp16 tiles do not spill registers, and the masking kernel has no FMA (bit-exactness)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "bgpo_kernels._compile_check", "--arch", str(arch), "--first", "--strict",
         "--dtypes", "bf16", "fp16", "fp32"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
