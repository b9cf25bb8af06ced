"""GPU checks of the kernels (issue 12), at LLaDA's sizes: skipped unless ``BGPO_TEST_DEVICE=cuda`` on a
machine with a GPU (``scripts/gpu_check.sh`` runs them so).

* LLaDA's LM head (V = 126464, H = 4096, B = 4, L = 512, half masked), with and without soft-cap and bias:
  every GPU backend against the torch backend on fp32 copies, with the error rule of DEVELOPERS.md
  (|backend - ref32| <= 2 |ref_lowp - ref32| + tiny, ref_lowp the full-logits path in bf16);
* a weight of more than 2**31 elements; N = 0, expanded and strided MC weights, all masked, zero
  advantages, strided hidden;
* forward bit-identical across runs, backward deterministic;
* masks bit-identical across torch-CPU, torch-CUDA, Triton and the CUDA extension (seeds negative,
  >= 2**31, >= 2**40; rows up to 65536 columns);
* the peak memory of one backward within the workspace the backend declares (``workspace_bytes``);
* an fp32 head under bf16 autocast: no bf16 copy of W (the backends round its tiles or blocks);
* ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import os

import pytest
import torch

import bgpo
from bgpo.backends import available_backends, resolve_backend
from bgpo.memory import track_peak_memory
from bgpo.reference import fused_elbo_loss_reference
from conftest import TEST_DEVICE

ON_GPU = TEST_DEVICE.type == "cuda" and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not ON_GPU, reason="GPU tests: run with BGPO_TEST_DEVICE=cuda on a machine with a GPU (scripts/gpu_check.sh does)"
)
GPU = torch.device("cuda")


def _gpu_backends(op, names):
    """The named backends that can run on the GPU; without one, all of them (collected, then skipped)."""
    return [b for b in names if not ON_GPU or b in available_backends(op, GPU)]


GPU_BACKENDS = _gpu_backends("fused_elbo_loss", ("triton", "cuda"))
MASK_BACKENDS = _gpu_backends("random_mask", ("torch", "triton", "cuda"))
NAMES = ["loss", "elbo", "grad_hidden", "grad_weight", "grad_bias"]
LLADA = dict(B=4, L=512, H=4096, V=126464)


def _problem(B, L, H, V, *, dtype=torch.bfloat16, bias=False, mask_rate=0.5, seed=0):
    """Leaves (hidden, weight, bias | None) on the GPU and (targets, masked, elbo_weight, advantages, old)."""
    g = torch.Generator(device=GPU).manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g, device=GPU)
    weight = torch.randn(V, H, generator=g, device=GPU) * H**-0.5
    b = torch.randn(V, generator=g, device=GPU) * 0.5 if bias else None
    targets = torch.randint(0, V, (B, L), generator=g, device=GPU)
    masked = torch.rand(B, L, generator=g, device=GPU) < mask_rate
    elbo_weight = torch.rand(B, generator=g, device=GPU) * 3 + 1
    advantages = torch.randn(B, generator=g, device=GPU)
    old = torch.randn(B, generator=g, device=GPU) * 0.1  # added to ℓ below: a slightly off-policy update
    leaves = [x if x is None else x.to(dtype).requires_grad_() for x in (hidden, weight, b)]
    return leaves, (targets, masked, elbo_weight, advantages, old)


def _run(fn, leaves, rest, *, off_policy=True, **kwargs):
    """[loss, elbo, grads...] as fp32, forward + backward of ``fn`` (fused_elbo_loss or the reference)."""
    hidden, weight, bias = leaves
    targets, masked, elbo_weight, advantages, shift = rest
    old = None
    if off_policy:
        with torch.no_grad():
            old = bgpo.fused_elbo(hidden.float(), weight.float(), targets, masked, elbo_weight,
                                  bias=None if bias is None else bias.float(), softcap=kwargs.get("softcap"),
                                  backend="torch") + shift
    out = fn(hidden, weight, targets, masked, elbo_weight, advantages, old, num_samples=4, bias=bias, **kwargs)
    grads = torch.autograd.grad(out.loss, [x for x in leaves if x is not None])
    return [out.loss.float(), out.elbo.float()] + [g.float() for g in grads]


def _fp32(leaves):
    return [None if x is None else x.detach().float().requires_grad_() for x in leaves]


def _assert_error_rule(out, ref_lowp, ref32, what):
    for name, a, lowp, exact in zip(NAMES, out, ref_lowp, ref32):
        allowed = 2 * (lowp - exact).abs().max() + 1e-6 * exact.abs().max()
        error = (a - exact).abs().max()
        assert error <= allowed, f"{what} {name}: error {error:.3g} > allowed {allowed:.3g}"


@pytest.fixture(scope="module")
def llada_cases():
    """(leaves, rest, ref_lowp, ref32) per (softcap, bias), computed once."""
    cache = {}

    def get(softcap, bias):
        if (softcap, bias) not in cache:
            leaves, rest = _problem(**LLADA, bias=bias)
            kwargs = dict(softcap=softcap)
            ref_lowp = _run(fused_elbo_loss_reference, leaves, rest, **kwargs)
            ref32 = _run(bgpo.fused_elbo_loss, _fp32(leaves), rest, backend="torch", **kwargs)
            cache.clear()  # one problem at a time on the GPU
            cache[softcap, bias] = leaves, rest, ref_lowp, ref32
        return cache[softcap, bias]
    return get


def test_the_gpu_backends_are_there():
    # Without this a failed Triton import or extension build would drop their tests silently.
    assert "triton" in available_backends("fused_elbo_loss", GPU)
    if os.environ.get("BGPO_SKIP_EXTENSION") != "1":
        assert "cuda" in available_backends("fused_elbo_loss", GPU)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("softcap,bias", [(None, False), (None, True), (30.0, False), (30.0, True)])
def test_llada_head_error_rule(backend, softcap, bias, llada_cases):
    leaves, rest, ref_lowp, ref32 = llada_cases(softcap, bias)
    out = _run(bgpo.fused_elbo_loss, leaves, rest, backend=backend, softcap=softcap)
    _assert_error_rule(out, ref_lowp, ref32, f"{backend} softcap={softcap} bias={bias}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_weight_of_more_than_2_31_elements(backend):
    """V x H = 524291 x 4096 > 2**31: 64-bit offsets in every pointer computation.  Targets in the last
    rows of W, so a wrapped 32-bit offset reads or writes the wrong rows."""
    B, L, H, V = 1, 64, 4096, 2**19 + 3
    assert V * H > 2**31
    leaves, (targets, masked, elbo_weight, advantages, old) = _problem(B, L, H, V, mask_rate=0.5)
    targets = V - 1 - targets % 64  # the last 64 rows of W
    rest = (targets, masked, elbo_weight, advantages, old)
    out = _run(bgpo.fused_elbo_loss, leaves, rest, off_policy=False, backend=backend)
    ref = _run(bgpo.fused_elbo_loss, leaves, rest, off_policy=False, backend="torch")
    for name, a, b in zip(NAMES, out, ref):
        scale = b.abs().max().item()
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2 * scale + 1e-6), name
    assert out[3][-64:].abs().max() > 0


def _edge_cases():
    def none_masked(t, m, w, a):
        return t, torch.zeros_like(m), w, a

    def all_masked(t, m, w, a):
        return t, torch.ones_like(m), w, a

    def expanded_weight(t, m, w, a):
        return t, m, torch.tensor([1.5], device=GPU).expand(m.shape[0]), a

    def strided_weight(t, m, w, a):
        return t, m, (torch.rand(2 * m.shape[0], device=GPU) + 0.5)[::2], a

    def zero_advantages(t, m, w, a):
        return t, m, w, torch.zeros_like(a)

    return {f.__name__: f for f in (none_masked, all_masked, expanded_weight, strided_weight, zero_advantages)}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", list(_edge_cases()) + ["strided_hidden"])
def test_edge_cases_match_torch(backend, case):
    leaves, (targets, masked, elbo_weight, advantages, _) = _problem(3, 64, 256, 5003, dtype=torch.float32,
                                                                     bias=True)
    if case == "strided_hidden":
        hidden = leaves[0].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        leaves = [hidden] + leaves[1:]
    else:
        targets, masked, elbo_weight, advantages = _edge_cases()[case](targets, masked, elbo_weight, advantages)
    rest = (targets, masked, elbo_weight, advantages, None)
    out = _run(bgpo.fused_elbo_loss, leaves, rest, off_policy=False, backend=backend)
    ref = _run(bgpo.fused_elbo_loss, leaves, rest, off_policy=False, backend="torch")
    for name, a, b in zip(NAMES, out, ref):
        assert torch.isfinite(a).all(), name
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item())), name
    if case in ("none_masked", "zero_advantages"):
        assert all(g.abs().max() == 0 for g in out[2:])


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["torch"])
def test_forward_bit_identical_and_backward_deterministic(backend):
    leaves, rest = _problem(4, 256, 1024, 32000, bias=True)
    first = _run(bgpo.fused_elbo_loss, leaves, rest, backend=backend)
    second = _run(bgpo.fused_elbo_loss, leaves, rest, backend=backend)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{backend}: {name} differs between two identical calls"


@pytest.mark.parametrize("seed", [-7, 2**31 + 5, 2**40 + 3])
@pytest.mark.parametrize("scheme", ["stratified", "bernoulli"])
def test_masks_bit_identical_across_devices_and_backends(seed, scheme):
    lengths = [1, 7, 4096, 65536]
    C = max(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (len(lengths), C), generator=g)
    maskable = torch.arange(C) < torch.tensor(lengths).unsqueeze(1)
    kwargs = dict(mask_id=126336, seed=seed, num_samples=8, scheme=scheme,
                  sequence_ids=torch.tensor([0, 5, 2**31 - 1, 77]))
    for j in (0, 7):
        ref = bgpo.random_mask(ids, maskable, sample_index=j, backend="torch", **kwargs)
        for backend in MASK_BACKENDS:
            gpu_kwargs = dict(kwargs, sequence_ids=kwargs["sequence_ids"].to(GPU))
            out = bgpo.random_mask(ids.to(GPU), maskable.to(GPU), sample_index=j, backend=backend, **gpu_kwargs)
            for name, a, b in zip(out._fields, out, ref):
                assert torch.equal(a.cpu(), b), f"{backend} seed={seed} j={j}: {name} differs from torch-CPU"


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["torch"])
def test_backward_peak_within_declared_workspace(backend):
    """One backward at LLaDA's head, every position masked (the declared workspace assumes N = B·L): the
    allocator's peak above entry, less the gradients it returns, is at most the declared workspace."""
    leaves, (targets, masked, elbo_weight, advantages, _) = _problem(**LLADA)
    masked = torch.ones_like(masked)
    hidden, weight, _ = leaves
    out = bgpo.fused_elbo_loss(hidden, weight, targets, masked, elbo_weight, advantages, num_samples=4,
                               backend=backend)
    impl = resolve_backend("fused_elbo_loss", backend, GPU).impl
    declare = getattr(impl, "workspace_bytes", None)
    assert declare is not None, f"{backend} declares no workspace_bytes"
    declared = declare("backward", hidden, weight, 0, True)
    with track_peak_memory(GPU) as mem:
        out.loss.backward()
    returned = sum(t.numel() * t.element_size() for t in (hidden, weight))
    extra = mem.peak_bytes - returned
    assert extra <= 1.05 * declared + 2**24, f"{backend}: backward used {extra / 2**20:.0f} MiB beyond its " \
        f"gradients, declared {declared / 2**20:.0f} MiB"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_fp32_head_makes_no_copy_of_the_weight(backend):
    """LLaDA's head in fp32 under bf16 autocast: the Triton kernels round W's tiles as they load them, the CUDA
    backend its blocks (forward) and tiles (backward), so the forward and the backward (beyond the fp32
    gradients it returns) stay far below the 1 GiB bf16 copy of W that casting it would make, and ℓ is that
    of the bf16 casts."""
    leaves, (targets, masked, elbo_weight, advantages, _) = _problem(**LLADA, dtype=torch.float32)
    hidden, weight, _ = leaves
    args = (targets, masked, elbo_weight, advantages)
    copy = weight.numel() * 2
    with torch.autocast("cuda", dtype=torch.bfloat16), track_peak_memory(GPU) as forward:
        out = bgpo.fused_elbo_loss(hidden, weight, *args, num_samples=4, backend=backend)
    with track_peak_memory(GPU) as backward:
        out.loss.backward()
    returned = (weight.numel() + hidden.numel()) * 4
    assert forward.peak_bytes < copy / 2, f"forward peaked at {forward.peak_bytes / 2**20:.0f} MiB"
    assert backward.peak_bytes - returned < copy / 2, f"backward peaked at {backward.peak_bytes / 2**20:.0f} MiB"
    with torch.no_grad():
        cast = bgpo.fused_elbo_loss(hidden.bfloat16(), weight.bfloat16(), *args, num_samples=4, backend=backend)
    torch.testing.assert_close(out.elbo, cast.elbo, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["torch"])
def test_torch_compile_fullgraph(backend):
    leaves, (targets, masked, elbo_weight, advantages, _) = _problem(2, 128, 256, 5003, dtype=torch.float32)
    hidden, weight, _ = leaves

    def step(hidden, weight):
        out = bgpo.fused_elbo_loss(hidden, weight, targets, masked, elbo_weight, advantages, num_samples=4,
                                   backend=backend)
        return out.loss, out.elbo

    eager = step(hidden, weight)
    eager_grads = torch.autograd.grad(eager[0], [hidden, weight])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(hidden, weight)
    compiled_grads = torch.autograd.grad(compiled[0], [hidden, weight])
    for a, b in zip(list(compiled) + list(compiled_grads), list(eager) + list(eager_grads)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))
