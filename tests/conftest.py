"""Test configuration.

``BGPO_TEST_DEVICE`` (default ``cpu``) is the device the op tests build their tensors on: with
``BGPO_TEST_DEVICE=cuda`` every backend of ``random_mask`` and ``fused_elbo_loss`` runs on CUDA tensors
and Triton compiles for the GPU; otherwise Triton runs in its interpreter on the CPU
(``TRITON_INTERPRET=1``, set here before anything imports triton).  Op tests take the ``device``
fixture, or ``TEST_DEVICE`` (``from conftest import TEST_DEVICE``) where a parameter list needs it at
import time.
"""
import os

_DEVICE = os.environ.get("BGPO_TEST_DEVICE", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "0" if _DEVICE.startswith("cuda") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TEST_DEVICE = torch.device(_DEVICE)


def pytest_configure(config):
    if TEST_DEVICE.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"BGPO_TEST_DEVICE: expected 'cpu' or 'cuda[:N]', got {_DEVICE!r}")
    if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("BGPO_TEST_DEVICE=cuda but torch sees no GPU (torch.cuda.is_available() is False)")
    if TEST_DEVICE.type == "cuda" and os.environ["TRITON_INTERPRET"] == "1":
        raise pytest.UsageError("BGPO_TEST_DEVICE=cuda with TRITON_INTERPRET=1 would check the interpreter, "
                                "not the GPU kernels: unset TRITON_INTERPRET")


@pytest.fixture
def device():
    """The device of the op tests' tensors (``BGPO_TEST_DEVICE``, default cpu)."""
    return TEST_DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_lm():
    """A tiny LLaDA (bidirectional, 2 layers, d_model 64, 128-token vocabulary) in fp32."""
    from bgpo.models import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(1234)
    return LLaDAModelLM(LLaDAConfig.preset("tiny"))


@pytest.fixture(scope="session")
def triton_draws():
    """``draws(seed, offsets) -> (words, uniforms)``: ``tl.randint`` / ``tl.rand`` of the installed Triton,
    drawn on ``TEST_DEVICE`` (the GPU's Philox when it is CUDA), returned on the CPU."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def draw_kernel(seed, offsets_ptr, words_ptr, uniforms_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = idx < n
        offsets = tl.load(offsets_ptr + idx, mask=keep)
        tl.store(words_ptr + idx, tl.randint(seed, offsets), mask=keep)
        tl.store(uniforms_ptr + idx, tl.rand(seed, offsets), mask=keep)

    def draws(seed, offsets, block=2**12):
        n = offsets.numel()
        offsets = offsets.to(TEST_DEVICE)
        words = torch.empty(n, dtype=torch.int32, device=TEST_DEVICE)
        uniforms = torch.empty(n, dtype=torch.float32, device=TEST_DEVICE)
        draw_kernel[(triton.cdiv(n, block),)](seed, offsets, words, uniforms, n, BLOCK=block)
        return words.cpu().to(torch.int64) & 0xFFFFFFFF, uniforms.cpu()

    return draws


def measure_real_and_fake(build, run):
    """(real CPU peak, simulated peak) in bytes of ``run(*build())``: the same code on real tensors under the
    CPU allocator's tracker and on fake tensors under ``bgpo.memory``'s simulator."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bgpo.memory import track_fake_memory, track_peak_memory

    inputs = build()
    with track_peak_memory("cpu") as real:
        run(*inputs)
    with FakeTensorMode():
        inputs = build()
        with track_fake_memory() as fake:
            run(*inputs)
    return real.peak_bytes, fake.peak_bytes
