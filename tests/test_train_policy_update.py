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


@pytest.mark.parametrize("objective, option", [
    ("wd1", "clip"), ("spg", "clip"), ("diffu_grpo", "clip"), ("spg", "old_elbos"), ("diffu_grpo", "old_elbos"),
    ("bgpo", "spg_options"), ("vrpo", "diffu_grpo_options"), ("wd1", "spg_options"),
])
def test_an_option_the_objective_does_not_read_is_refused(objective, option):
    """Regression: clip with wd1/spg, old_elbos with spg, spg_options with bgpo... were accepted and silently
    ignored (the same gradient as without them)."""
    model, batch = _setup()
    value = {"clip": (0.8, 1.2), "old_elbos": torch.zeros(2, 8), "spg_options": {"beta": 1.0},
             "diffu_grpo_options": {"iteration": 0}}[option]
    with pytest.raises(ValueError, match=f"^{option}: objective '{objective}' does not use it"):
        accumulate_policy_gradient(model, batch, objective=objective, num_samples=2, seed=1, **{option: value})


def test_wd1_needs_groups_and_its_gradient_is_wd1_loss_summed_over_samples():
    """wd1 through the pipeline equals ``objectives.wd1_loss`` of each sample's ELBO, summed over the n_t
    samples (no test checked its scale: dropping the × G went unnoticed); a group of one is refused (its
    softmax weights are all 0: a zero gradient, silently)."""
    from bgpo import objectives

    model, batch = _setup()
    out = accumulate_policy_gradient(model, batch, objective="wd1", num_samples=3, seed=1)
    pipeline = _grads(model)
    model.zero_grad()
    elbos = old_policy_elbos(model, batch, num_samples=3, seed=1)  # no grad: the same masks' values
    torch.testing.assert_close(out["elbo"], elbos)
    with torch.enable_grad():
        from bgpo.policy_update import _sample_elbo
        from bgpo.ops.fused_elbo_loss import fused_elbo

        loss = sum(objectives.wd1_loss(fused_elbo(**_sample_elbo(model, batch, range(j, j + 1), num_samples=3, seed=1,
                                                                 scheme="stratified", backend="auto")),
                                       batch.advantages, group_size=4, num_samples=3) for j in range(3))
        loss.backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(pipeline[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    single = PolicyBatch(batch.input_ids, 6, batch.response_mask, batch.advantages, batch.sequence_ids)
    with pytest.raises(ValueError, match="group_size: wd1 weighs responses"):
        accumulate_policy_gradient(model, single, objective="wd1", num_samples=2, seed=1)
