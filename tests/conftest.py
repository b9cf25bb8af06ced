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
