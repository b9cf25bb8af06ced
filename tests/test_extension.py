"""The C++/CUDA extension bgpo._C: registration, Philox and masks bit for bit, the C++ CPU fused op.

The extension is optional: without it these tests skip, unless BGPO_REQUIRE_EXTENSION=1 (CI sets it,
and BGPO_REQUIRE_CUDA_EXTENSION=1 for the CUDA kernels), when a missing build is a failure.
The fused op's core cases run on the "cpu" backend through tests/test_fused_elbo_loss.py, which is
parametrized over every backend available on the CPU; here are the extension-specific ones.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bgpo
from bgpo import philox
from bgpo.memory import track_peak_memory
from bgpo.backends import registered_backend, registered_backends, resolve_backend
from bgpo.ops import _cpp
from bgpo.ops._fused_elbo_loss_torch import backward as torch_backward
from bgpo.ops._fused_elbo_loss_torch import forward as torch_forward
from bgpo.ops.random_mask import random_mask_torch
from conftest import measure_real_and_fake

ROOT = Path(__file__).resolve().parents[1]
OPS = ("random_mask", "fused_elbo_loss_fwd", "fused_elbo_loss_bwd", "philox_randint", "philox_rand")


def _flag(name):
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


if not _cpp.available():
    if _flag("BGPO_REQUIRE_EXTENSION") or _flag("BGPO_REQUIRE_CUDA_EXTENSION"):
        raise RuntimeError(f"BGPO_REQUIRE_EXTENSION is set but bgpo._C does not load: {_cpp.import_error()!r}")
    pytest.skip(f"bgpo._C is not built ({_cpp.import_error()})", allow_module_level=True)

ops = torch.ops.bgpo_C


# ------------------------------------------------------------------------------------------------
# Build and registration
# ------------------------------------------------------------------------------------------------


def test_extension_imports_and_registers_cpu_kernels():
    import bgpo._C  # noqa: F401

    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bgpo_C::{op}", "CPU"), op
    for op in ("random_mask", "fused_elbo_loss"):
        assert {"torch", "cpu", "cuda"} <= set(registered_backends(op))
        assert resolve_backend(op, "cpu", torch.device("cpu")).name == "cpu"


def test_cuda_kernels_registered():
    if not _cpp.has_cuda_kernels():
        if _flag("BGPO_REQUIRE_CUDA_EXTENSION"):
            pytest.fail("BGPO_REQUIRE_CUDA_EXTENSION is set but bgpo._C has no CUDA kernels")
        pytest.skip("bgpo._C was built without CUDA")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bgpo_C::{op}", "CUDA"), op
    # Without a GPU the "cuda" backend is registered but refuses CPU tensors, with the reason.
    for op in ("random_mask", "fused_elbo_loss"):
        with pytest.raises(ValueError, match="CUDA tensors"):
            resolve_backend(op, "cuda", torch.device("cpu"))


def test_cuda_backend_reason_when_built_without_cuda():
    if _cpp.has_cuda_kernels():
        pytest.skip("bgpo._C has CUDA kernels")
    with pytest.raises(ValueError, match="built without CUDA"):
        resolve_backend("fused_elbo_loss", "cuda", torch.device("cuda"))


def test_auto_uses_the_cpp_cpu_path_when_measured_faster():
    for op in ("random_mask", "fused_elbo_loss"):
        expected = "cpu" if _cpp.CPU_AUTO[op] else "torch"
        assert resolve_backend(op, "auto", torch.device("cpu")).name == expected


def test_missing_extension_is_reported_once(tmp_path):
    """Without bgpo._C the library imports, works on its Python paths and warns exactly once."""
    script = (
        "import sys, warnings\n"
        "sys.modules['bgpo._C'] = None\n"  # makes `import bgpo._C` raise ImportError
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import bgpo\n"
        "    import bgpo._extensions\n"
        "    bgpo._extensions.load()\n"
        "import torch\n"
        "from bgpo.backends import resolve_backend\n"
        "assert resolve_backend('fused_elbo_loss', 'auto', torch.device('cpu')).name != 'cpu'\n"
        "msgs = [str(w.message) for w in caught if 'bgpo._C' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(msgs[0])\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "pip install --no-build-isolation -e ." in run.stdout


# ------------------------------------------------------------------------------------------------
# Philox: C++ = torch path = Triton interpreter, bit for bit
# ------------------------------------------------------------------------------------------------

SEEDS = [0, -1, 2**63 - 1, -(2**63), 0x1234567890ABCDEF, 42]


def _offsets(seed, n):
    g = torch.Generator().manual_seed(seed & 0xFFFF)
    return torch.cat([
        torch.arange(4096, dtype=torch.int64),
        (torch.arange(4096, dtype=torch.int64) << 32) + 2**31 + 3,  # sequence-level draws, above 2**32
        torch.tensor([2**32 - 1, 2**32, 2**63 - 1, -1, -(2**63)], dtype=torch.int64),
        torch.randint(-(2**63), 2**63 - 1, (n - 8197,), generator=g, dtype=torch.int64),
    ])


@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_philox_matches_torch_path(seed):
    offsets = _offsets(seed, 2**20 if seed in (0, -1, 2**63 - 1) else 2**16)  # > 3 million draws in all
    words = ops.philox_randint(seed, offsets)
    assert words.dtype == torch.int64
    assert torch.equal(words, philox.randint(seed, offsets))
    uniforms = ops.philox_rand(seed, offsets)
    assert torch.equal(uniforms.view(torch.int32), philox.rand(seed, offsets).view(torch.int32))
    offsets32 = offsets[:4096].to(torch.int32) - 2048  # negative int32 offsets are taken as uint32
    assert torch.equal(ops.philox_randint(seed, offsets32), philox.randint(seed, offsets32))


def test_cpp_philox_known_answers():
    # counter 0, key 0 -> first word 0x6627e8d5 (Random123); key all-ones, counter (2**32-1, 2**32-1, 0, 0)
    # is checked through the torch path, which has its own known-answer test.
    assert int(ops.philox_randint(0, torch.tensor([0]))) == 0x6627E8D5


@pytest.mark.parametrize("seed", [0, -1, 2**63 - 1])
def test_cpp_philox_matches_triton_interpreter(seed, triton_draws):
    offsets = _offsets(seed, 2**20 // 3 + 1)  # a million draws over the three seeds
    words, uniforms = triton_draws(seed, offsets, block=2**15)
    assert torch.equal(ops.philox_randint(seed, offsets), words)
    assert torch.equal(ops.philox_rand(seed, offsets).view(torch.int32), uniforms.view(torch.int32))


# ------------------------------------------------------------------------------------------------
# random_mask: C++ = torch reference, bit for bit
# ------------------------------------------------------------------------------------------------


def _mask_case(g, B, C, dtype=torch.int64):
    ids = torch.randint(0, 50_000, (B, C), generator=g).to(dtype)
    density = torch.rand(B, 1, generator=g)
    maskable = torch.rand(B, C, generator=g) < density
    maskable[0] = False  # a sequence with nothing maskable
    if B > 1:
        maskable[1] = True  # one with everything maskable
    seq = torch.randint(0, 2**31, (B,), generator=g)
    return ids, maskable, seq


@pytest.mark.parametrize("scheme", ["stratified", "bernoulli"])
@pytest.mark.parametrize("stratify_t", [False, True])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_cpp_random_mask_bit_identical(scheme, stratify_t, length_normalize):
    g = torch.Generator().manual_seed(11)
    for trial in range(25):
        B = int(torch.randint(1, 9, (1,), generator=g))
        C = int(torch.randint(1, 700, (1,), generator=g))
        ids, maskable, seq = _mask_case(g, B, C, dtype=torch.int32 if trial % 3 == 0 else torch.int64)
        n = int(torch.randint(1, 33, (1,), generator=g))
        seed = [0, -1, 2**63 - 1, int(torch.randint(-(2**62), 2**62, (1,), generator=g))][trial % 4]
        t_min = [0.0, 1e-3, 0.3][trial % 3]
        for j in {0, n - 1, int(torch.randint(0, n, (1,), generator=g))}:
            args = (ids, maskable, seq, 126336, seed, j, n, scheme, t_min, stratify_t, length_normalize)
            ref = random_mask_torch(*args)
            out = ops.random_mask(*args)
            for name, r, o in zip(("noisy_ids", "masked", "elbo_weight"), ref, out):
                assert r.dtype == o.dtype and r.shape == o.shape, name
                assert torch.equal(r, o), (name, trial, j)


def test_cpp_random_mask_widest_rows_and_public_api():
    g = torch.Generator().manual_seed(5)
    ids, maskable, seq = _mask_case(g, 3, 2**16)
    maskable[2] = torch.rand(2**16, generator=g) < 0.9
    for scheme in ("stratified", "bernoulli"):
        for j in (0, 5):
            args = (ids, maskable, seq, 7, 2**63 - 1, j, 8, scheme, 1e-3, False, False)
            assert all(torch.equal(r, o) for r, o in zip(random_mask_torch(*args), ops.random_mask(*args)))
    # Through the public API, auto and "cpu" give the torch backend's bits.
    kw = dict(mask_id=9, seed=-5, sample_index=2, num_samples=4)
    ref = bgpo.random_mask(ids[:, :300], maskable[:, :300], backend="torch", **kw)
    for backend in ("cpu", "auto"):
        out = bgpo.random_mask(ids[:, :300], maskable[:, :300], backend=backend, **kw)
        assert all(torch.equal(r, o) for r, o in zip(ref, out))


def test_cpp_random_mask_rejects_bad_arguments():
    ids = torch.zeros(2, 4, dtype=torch.int64)
    maskable = torch.ones(2, 4, dtype=torch.bool)
    seq = torch.arange(2)
    with pytest.raises(RuntimeError, match="scheme"):
        ops.random_mask(ids, maskable, seq, 1, 0, 0, 1, "uniform", 0.0, False, False)
    with pytest.raises(RuntimeError, match="sample_index"):
        ops.random_mask(ids, maskable, seq, 1, 0, 3, 2, "stratified", 0.0, False, False)
    with pytest.raises(RuntimeError, match="maskable"):
        ops.random_mask(ids, maskable[:, :3], seq, 1, 0, 0, 1, "stratified", 0.0, False, False)


# ------------------------------------------------------------------------------------------------
# The C++ CPU fused op against the torch backend (the full-logits reference runs in
# tests/test_fused_elbo_loss.py on the "cpu" backend)
# ------------------------------------------------------------------------------------------------


def _elbo_case(dtype, bias, B=3, L=11, H=24, V=53, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < density
    elbo_weight = torch.rand(B, generator=g) * 3 + 0.5  # non-uniform per sequence
    grad_elbo = torch.randn(B, generator=g)
    return hidden, weight, b, targets, masked, elbo_weight, grad_elbo


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [0, 1, 4])
def test_cpp_fused_op_matches_torch_backend(dtype, bias, softcap, chunk_size):
    hidden, weight, b, targets, masked, w, grad = _elbo_case(dtype, bias)
    ref_elbo, ref_lse = torch_forward(hidden, weight, b, targets, masked, w, softcap, chunk_size)
    elbo, lse = ops.fused_elbo_loss_fwd(hidden, weight, b, targets, masked, w, softcap, chunk_size)
    assert elbo.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == masked.shape
    torch.testing.assert_close(elbo, ref_elbo, **_tol(dtype))
    torch.testing.assert_close(lse, ref_lse, **_tol(dtype))
    assert torch.all(lse[~masked] == 0)
    ref = torch_backward(grad, hidden, weight, b, targets, masked, w, ref_lse, softcap, chunk_size, True, True, bias)
    out = ops.fused_elbo_loss_bwd(grad, hidden, weight, b, targets, masked, w, lse, softcap, chunk_size,
                                  True, True, bias)
    for name, r, o in zip(("grad_hidden", "grad_weight", "grad_bias"), ref, out):
        assert o.dtype == r.dtype and o.shape == r.shape, name
        torch.testing.assert_close(o.float(), r.float(), **_tol(dtype), msg=name)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True), (False,) * 3])
def test_cpp_fused_backward_computes_only_what_is_needed(need):
    hidden, weight, b, targets, masked, w, grad = _elbo_case(torch.float32, True)
    _, lse = ops.fused_elbo_loss_fwd(hidden, weight, b, targets, masked, w, None, 0)
    full = ops.fused_elbo_loss_bwd(grad, hidden, weight, b, targets, masked, w, lse, None, 0, True, True, True)
    out = ops.fused_elbo_loss_bwd(grad, hidden, weight, b, targets, masked, w, lse, None, 0, *need)
    for wanted, f, o in zip(need, full, out):
        if wanted:
            torch.testing.assert_close(o, f)
        else:
            assert o.numel() == 0


def test_cpp_fused_op_layouts_and_edge_cases():
    hidden, weight, b, targets, masked, w, grad = _elbo_case(torch.float32, False, B=2, L=6)
    # Non-contiguous inputs and int32 targets give the contiguous result.
    ref = ops.fused_elbo_loss_fwd(hidden, weight, b, targets, masked, w, None, 0)
    hidden_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    weight_t = weight.t().contiguous().t()
    out = ops.fused_elbo_loss_fwd(hidden_t, weight_t, b, targets.to(torch.int32), masked, w.double(), None, 0)
    torch.testing.assert_close(out, ref)
    # Nothing masked: zero ELBO, zero gradients.
    none = torch.zeros_like(masked)
    elbo, lse = ops.fused_elbo_loss_fwd(hidden, weight, b, targets, none, w, None, 0)
    assert torch.all(elbo == 0) and torch.all(lse == 0)
    gh, gw, _ = ops.fused_elbo_loss_bwd(grad, hidden, weight, b, targets, none, w, lse, None, 0, True, True, False)
    assert torch.all(gh == 0) and torch.all(gw == 0)
    # A per-sequence weight scales exactly its own rows (the classic single-scalar bug).
    _, lse = ops.fused_elbo_loss_fwd(hidden, weight, b, targets, masked, w, None, 0)
    gh, _, _ = ops.fused_elbo_loss_bwd(grad, hidden, weight, b, targets, masked, w, lse, None, 0, True, False, False)
    gh2, _, _ = ops.fused_elbo_loss_bwd(grad, hidden, weight, b, targets, masked, w * torch.tensor([1.0, 2.0]), lse,
                                        None, 0, True, False, False)
    torch.testing.assert_close(gh2[0], gh[0])
    torch.testing.assert_close(gh2[1], 2 * gh[1])


def test_cpp_fused_op_rejects_bad_arguments():
    hidden, weight, b, targets, masked, w, _ = _elbo_case(torch.float32, False)
    bad = targets.clone()
    bad[masked] = weight.shape[0]
    with pytest.raises(RuntimeError, match="outside"):
        ops.fused_elbo_loss_fwd(hidden, weight, b, bad, masked, w, None, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.fused_elbo_loss_fwd(hidden, weight.double(), b, targets, masked, w, None, 0)
    # bf16 rows take their own dtype or an fp32 W (autocast, rounded per block): not another half type
    with pytest.raises(RuntimeError, match=r"weight must have the dtype of hidden \(BFloat16\) or float32"):
        ops.fused_elbo_loss_fwd(hidden.bfloat16(), weight.half(), b, targets, masked, w, None, 0)
    rounded = ops.fused_elbo_loss_fwd(hidden.bfloat16(), weight, b, targets, masked, w, None, 0)[0]
    torch.testing.assert_close(rounded, ops.fused_elbo_loss_fwd(hidden.bfloat16(), weight.bfloat16(), b, targets,
                                                                masked, w, None, 0)[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="softcap"):
        ops.fused_elbo_loss_fwd(hidden, weight, b, targets, masked, w, -1.0, 0)


def test_cpp_fused_elbo_loss_end_to_end_gradients():
    """The public op on backend="cpu": loss and every gradient as the torch backend, bf16 included."""
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, b, targets, masked, w, _ = _elbo_case(dtype, True, seed=3)
        adv = torch.tensor([1.0, -0.5, 0.25])
        old = torch.randn(3) * 0.1 - 5.0
        results = {}
        for backend in ("torch", "cpu"):
            leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
            out = bgpo.fused_elbo_loss(leaves[0], leaves[1], targets, masked, w, adv, old, num_samples=4,
                                       bias=leaves[2], backend=backend, chunk_size=5)
            out.loss.backward()
            results[backend] = [out.loss.detach(), out.elbo] + [t.grad for t in leaves]
        for r, o in zip(results["torch"], results["cpu"]):
            torch.testing.assert_close(o.float(), r.float(), **_tol(dtype))


def test_cpp_fused_op_any_layout():
    """No kernel assumes contiguity: strided, transposed and expanded (stride 0) inputs give the results of
    their contiguous copies (defect 1 of issue 12)."""
    hidden, weight, b, targets, masked, _, _ = _elbo_case(torch.float32, True, B=3, L=10, H=16, V=700)
    B = hidden.shape[0]
    ws = {"strided": torch.rand(2 * B)[::2], "expanded": torch.tensor([1.5]).expand(B)}
    grad = torch.randn(2 * B)[::2]
    strided = dict(
        hidden=torch.randn(hidden.shape[1], hidden.shape[0], 2 * hidden.shape[2]).transpose(0, 1)[:, :, ::2],
        weight=weight.t().contiguous().t(), bias=torch.randn(2 * b.shape[0])[::2],
        targets=targets.t().contiguous().t().to(torch.int32), masked=torch.cat([masked, ~masked], 1)[:, ::2],
    )
    for w in ws.values():
        s = strided
        c = {k: v.contiguous() for k, v in s.items()}
        args = lambda t: (t["hidden"], t["weight"], t["bias"], t["targets"], t["masked"])  # noqa: E731
        ref = ops.fused_elbo_loss_fwd(*args(c), w.contiguous(), 2.0, 3)
        out = ops.fused_elbo_loss_fwd(*args(s), w, 2.0, 3)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        lse = ref[1]
        lse_strided = torch.stack([lse, lse], 2)[:, :, 0]
        ref = ops.fused_elbo_loss_bwd(grad.contiguous(), *args(c), w.contiguous(), lse, 2.0, 3, True, True, True)
        out = ops.fused_elbo_loss_bwd(grad, *args(s), w, lse_strided, 2.0, 3, True, True, True)
        for name, r, o in zip(("grad_hidden", "grad_weight", "grad_bias"), ref, out):
            torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-6, msg=name)
    # An expanded weight of 1.5 is a weight of 1.5.
    w15 = torch.full((B,), 1.5)
    args = (hidden, weight, b, targets, masked)
    torch.testing.assert_close(ops.fused_elbo_loss_fwd(*args, ws["expanded"], None, 0),
                               ops.fused_elbo_loss_fwd(*args, w15, None, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [0, 5])
def test_cpp_backward_over_several_vocabulary_tiles(dtype, chunk_size):
    """V spans three tiles of the backward (the last one partial), targets in each; one row block and
    several: as the torch backend."""
    rows, width = ops.fused_elbo_loss_tiles(True, 20, 1100, 512, chunk_size, False)
    assert width == 512 and (rows == 5 if chunk_size else rows == 20)
    hidden, weight, b, targets, masked, w, grad = _elbo_case(dtype, True, B=2, L=20, H=512, V=1100, seed=4)
    targets[:, ::3] = torch.randint(1024, 1100, (2, 7))  # in the partial tile
    for softcap in (None, 4.0):
        _, lse = torch_forward(hidden, weight, b, targets, masked, w, softcap, 0)
        ref = torch_backward(grad, hidden, weight, b, targets, masked, w, lse, softcap, 0, True, True, True)
        out = ops.fused_elbo_loss_bwd(grad, hidden, weight, b, targets, masked, w, lse, softcap, chunk_size,
                                      True, True, True)
        for name, r, o in zip(("grad_hidden", "grad_weight", "grad_bias"), ref, out):
            assert o.dtype == dtype, name
            torch.testing.assert_close(o.float(), r.float(), **_tol(dtype), msg=name)


@pytest.mark.parametrize("cuda", [False, True])
def test_cpp_tiling_plan_is_valid_for_every_row_count(cuda):
    """The tiling is a host function of the sizes shared by the CPU and CUDA backends: N = 0 included, it
    gives at least one row and a tile within the vocabulary, and never more logits than the budget
    (defect 2 of issue 12 was a division by the row count on CUDA)."""
    budget = 2**25 if cuda else 2**21
    for backward in (False, True):
        for n in (0, 1, 31, 4096, 10**6):
            for V, H in ((53, 24), (126464, 4096), (16384, 256)):
                rows, width = ops.fused_elbo_loss_tiles(backward, n, V, H, 0, cuda)
                assert 1 <= rows <= max(n, 1) and 1 <= width <= V
                assert width == V if not backward else width == min(V, max(512, (2**24 if cuda else 2**18) // H))
                assert rows * width <= max(budget, width), (backward, n, V, H)
                assert ops.fused_elbo_loss_tiles(backward, n, V, H, 7, cuda)[0] == max(1, min(7, n))
    with pytest.raises(RuntimeError, match="num_rows >= 0"):
        ops.fused_elbo_loss_tiles(True, -1, 10, 10, 0, cuda)


def test_cpp_out_of_range_targets_fail_loudly_in_both_passes():
    """Never garbage from an out-of-range target, even when the Python checks are bypassed (defect 3)."""
    hidden, weight, b, targets, masked, w, grad = _elbo_case(torch.float32, False)
    _, lse = ops.fused_elbo_loss_fwd(hidden, weight, b, targets, masked, w, None, 0)
    for value in (weight.shape[0], -1):
        bad = targets.clone()
        bad[tuple(masked.nonzero()[-1])] = value
        with pytest.raises(RuntimeError, match="outside"):
            ops.fused_elbo_loss_fwd(hidden, weight, b, bad, masked, w, None, 0)
        with pytest.raises(RuntimeError, match="outside"):
            ops.fused_elbo_loss_bwd(grad, hidden, weight, b, bad, masked, w, lse, None, 0, True, True, False)
    # An out-of-range target at an unmasked position is never read.
    ok = targets.clone()
    ok[~masked] = -7
    torch.testing.assert_close(ops.fused_elbo_loss_fwd(hidden, weight, b, ok, masked, w, None, 0),
                               ops.fused_elbo_loss_fwd(hidden, weight, b, targets, masked, w, None, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_backward_is_deterministic(dtype):
    hidden, weight, b, targets, masked, w, grad = _elbo_case(dtype, True, B=4, L=32, H=256, V=2500, seed=6)
    _, lse = ops.fused_elbo_loss_fwd(hidden, weight, b, targets, masked, w, 3.0, 0)
    for chunk_size in (0, 7):
        runs = [ops.fused_elbo_loss_bwd(grad, hidden, weight, b, targets, masked, w, lse, 3.0, chunk_size,
                                        True, True, True) for _ in range(2)]
        for first, second in zip(*runs):
            assert torch.equal(first, second)


def test_cpp_backward_allocates_no_fp32_vocab_buffer():
    """Issue 12's target: one bf16 backward at V = 16384, H = 256, 32 masked rows peaks at most 1.5x the
    bf16 grad W it returns (4.3x before the vocabulary-outer redesign), from the allocator's events."""
    V, H = 16384, 256
    hidden, weight, _, targets, masked, w, grad = _elbo_case(torch.bfloat16, False, B=2, L=32, H=H, V=V, seed=2)
    masked = torch.zeros_like(masked)
    masked[:, ::2] = True
    assert int(masked.sum()) == 32
    _, lse = ops.fused_elbo_loss_fwd(hidden, weight, None, targets, masked, w, None, 0)
    with track_peak_memory("cpu") as mem:
        _, grad_w, _ = ops.fused_elbo_loss_bwd(grad, hidden, weight, None, targets, masked, w, lse, None, 0,
                                               True, True, False)
    grad_w_bytes = grad_w.numel() * grad_w.element_size()
    assert mem.peak_bytes <= 1.5 * grad_w_bytes, mem.peak_bytes / grad_w_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 256, 128, 32000), (2, 2048, 64, 4096)])
def test_cpp_declared_workspace_matches_the_allocator(dtype, shape):
    """bgpo.memory's simulator counts what the "cpu" backend really allocates (forward + backward, all
    masked), within 5%: the workspace declaration follows the extension's own tiling."""
    b, l, h, v = shape

    def build():
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(b, l, h, generator=g).to(dtype).requires_grad_()
        weight = (torch.randn(v, h, generator=g) * 0.1).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (b, l), generator=g)
        return hidden, weight, targets, torch.ones(b, l, dtype=torch.bool), torch.ones(b), torch.ones(b)

    def run(*args):
        bgpo.fused_elbo_loss(*args, num_samples=2, backend="cpu").loss.backward()

    real, fake = measure_real_and_fake(build, run)
    assert abs(fake - real) <= 0.05 * real, (real, fake)


def test_declared_workspace_has_no_vocab_sized_fp32_buffer():
    """At LLaDA-8B's head (V = 126464, H = 4096, bf16, 2048 masked rows) each backend of bgpo._C declares
    less than the bf16 grad W it returns (the former design held an fp32 (V, H) buffer: 2x that), and the
    "cuda" backend declares its own (CUDA) tiling even on the CPU tensors the simulator may give it."""
    hidden = torch.empty(1, 2048, 4096, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(126464, 4096, dtype=torch.bfloat16, device="meta")
    declared = {name: registered_backend("fused_elbo_loss", name).impl.workspace_bytes
                for name in ("cpu", "cuda")}
    for name, fn in declared.items():
        assert fn("backward", hidden, weight, 0, True) < weight.numel() * 2, name
    # CUDA: one row block (R = 2048), Vt = 4096: N(Hs + 32) + R Vt (4 + s) + N H (4 + s)
    N, H, Vt = 2048, 4096, 4096
    assert declared["cuda"]("backward", hidden, weight, 0, True) == N * (2 * H + 32) + N * Vt * 6 + N * H * 6
    assert declared["cpu"]("backward", hidden, weight, 0, True) != declared["cuda"]("backward", hidden, weight, 0, True)


def test_cuda_backend_refuses_gpus_older_than_sm80(monkeypatch):
    """Defect 5: the kernels are built for sm_80+ (bf16); an older GPU is refused with the reason."""
    monkeypatch.setattr(_cpp, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    reason = _cpp._cuda_available(torch.device("cuda", 0))
    assert reason is not None and "sm_75" in reason and "8.0" in reason and "Tesla T4" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _cpp._cuda_available(torch.device("cuda", 0)) is None


def test_default_arch_list_embeds_ptx_for_newer_gpus():
    sys.path.insert(0, str(ROOT))
    try:
        import build_ext_config
    finally:
        sys.path.remove(str(ROOT))
    archs = build_ext_config.DEFAULT_ARCH_LIST.split(";")
    assert archs[0] == "8.0" and any(a.endswith("+PTX") for a in archs), archs
    assert "80-real 90" in (ROOT / "CMakeLists.txt").read_text()


# ------------------------------------------------------------------------------------------------
# CMake: the library CMake built (CI builds it before the tests) loads and runs
# ------------------------------------------------------------------------------------------------


def test_cmake_built_library_loads(tmp_path):
    lib = os.environ.get("BGPO_CMAKE_LIBRARY")
    if not lib:
        pytest.skip("BGPO_CMAKE_LIBRARY is not set (CI sets it after its CMake build)")
    offsets = torch.arange(1000, dtype=torch.int64) << 20
    torch.save({"offsets": offsets, "words": philox.randint(-1, offsets)}, tmp_path / "expected.pt")
    # The child does not import bgpo (bgpo._C would register the bgpo_C library a second time).
    script = (
        "import torch\n"
        f"torch.ops.load_library({lib!r})\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "assert torch.equal(torch.ops.bgpo_C.philox_randint(-1, expected['offsets']), expected['words'])\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr
