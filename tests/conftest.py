"""Test configuration: Triton runs in its interpreter on the CPU (set before anything imports triton)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TinyBidirectionalLM(torch.nn.Module):
    """A 2-layer bidirectional transformer (no causal mask) with an untied LM head, for objective tests."""

    def __init__(self, vocab_size=37, hidden_size=32, num_layers=2, num_heads=4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden_size)
        layer = torch.nn.TransformerEncoderLayer(hidden_size, num_heads, 2 * hidden_size, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.lm_head = torch.nn.Linear(hidden_size, vocab_size, bias=False)
        self.mask_token_id = vocab_size - 1

    def hidden_states(self, input_ids):
        return self.encoder(self.embed(input_ids))

    @property
    def lm_head_weight(self):
        return self.lm_head.weight


@pytest.fixture
def tiny_lm():
    torch.manual_seed(1234)
    return TinyBidirectionalLM()
