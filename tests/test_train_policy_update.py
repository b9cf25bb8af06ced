"""What the trainer added to ``accumulate_policy_gradient``: one gradient sync per call, diffu-GRPO's old
log-probs sliced per micro-batch, forward-only autocast."""
import pytest
import torch

from bgpo.models import LLaDAConfig, LLaDAModelLM
from bgpo.policy_update import PolicyBatch, accumulate_policy_gradient, old_policy_elbos, old_policy_token_logprobs


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


def test_kl_to_the_policy_itself_changes_nothing_and_spg_rejects_it():
    model, batch = _setup()
    accumulate_policy_gradient(model, batch, num_samples=3, seed=1)
    plain = _grads(model)
    model.zero_grad()
    ref = old_policy_elbos(model, batch, num_samples=3, seed=1)
    out = accumulate_policy_gradient(model, batch, num_samples=3, seed=1, ref_elbos=ref, beta=0.7)
    torch.testing.assert_close(out["elbo"], ref)
    for name, grad in _grads(model).items():  # k3 has zero gradient at the reference
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-8, msg=name)
    with pytest.raises(ValueError, match="beta: objective 'spg' takes no ELBO KL term"):
        accumulate_policy_gradient(model, batch, objective="spg", num_samples=3, seed=1, ref_elbos=ref, beta=0.1)
    with pytest.raises(ValueError, match=r"ref_elbos: expected shape \(3, 8\)"):
        accumulate_policy_gradient(model, batch, num_samples=3, seed=1, ref_elbos=ref[:, :4], beta=0.1)


def test_backward_hook_runs_every_backward():
    model, batch = _setup()
    calls = []

    def backward(loss):
        calls.append(loss.detach())
        loss.backward()

    accumulate_policy_gradient(model, batch, num_samples=3, seed=1, micro_batch_size=4, backward=backward)
    hooked = _grads(model)
    model.zero_grad()
    out = accumulate_policy_gradient(model, batch, num_samples=3, seed=1, micro_batch_size=4)
    assert len(calls) == 6 and sum(calls).item() == pytest.approx(out["loss"], rel=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(hooked[name], grad, msg=name)
