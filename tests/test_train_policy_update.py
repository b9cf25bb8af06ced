"""What the trainer added to ``accumulate_policy_gradient``: one gradient sync per call, diffu-GRPO's old
log-probs sliced per micro-batch, forward-only autocast."""
import torch

from bgpo.models import LLaDAConfig, LLaDAModelLM
from bgpo.policy_update import PolicyBatch, accumulate_policy_gradient, old_policy_token_logprobs


def _setup(seed=0):
    torch.manual_seed(seed)
    model = LLaDAModelLM(LLaDAConfig.preset("tiny"))
    ids = torch.randint(0, 100, (8, 12))
    response = torch.ones(8, 6, dtype=torch.bool)
    response[0, 4:] = False
    batch = PolicyBatch(ids, 6, response, torch.randn(8), torch.arange(8), group_size=4)
    return model, batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_sync_is_enabled_only_for_the_last_backward():
    model, batch = _setup()
    flags = []
    accumulate_policy_gradient(model, batch, num_samples=3, seed=1, micro_batch_size=4, gradient_sync=flags.append)
    assert flags == [False, True]
    flags.clear()
    accumulate_policy_gradient(model, batch, objective="vrpo", num_samples=3, seed=1, gradient_sync=flags.append)
    assert flags == [True, True]  # a single backward synchronises


def test_diffu_grpo_old_logprobs_are_sliced_per_micro_batch():
    model, batch = _setup()
    old = old_policy_token_logprobs(model, batch, seed=3, iteration=1) - 0.05
    options = {"iteration": 1, "old_logp": old}
    accumulate_policy_gradient(model, batch, objective="diffu_grpo", num_samples=1, seed=3, diffu_grpo_options=options)
    full = _grads(model)
    model.zero_grad()
    accumulate_policy_gradient(model, batch, objective="diffu_grpo", num_samples=1, seed=3, micro_batch_size=4,
                               diffu_grpo_options=options)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, full[name], rtol=1e-4, atol=1e-7, msg=name)


def test_autocast_covers_the_forward_only():
    model, batch = _setup()
    out = accumulate_policy_gradient(model, batch, num_samples=2, seed=1, autocast=torch.bfloat16)
    assert out["elbo"].dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
