"""Test configuration: Triton runs in its interpreter on the CPU (set before anything imports triton)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
    """``draws(seed, offsets) -> (words, uniforms)``: ``tl.randint`` / ``tl.rand`` of the installed Triton."""
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
        words = torch.empty(n, dtype=torch.int32)
        uniforms = torch.empty(n, dtype=torch.float32)
        draw_kernel[(triton.cdiv(n, block),)](seed, offsets, words, uniforms, n, BLOCK=block)
        return words.to(torch.int64) & 0xFFFFFFFF, uniforms

    return draws
