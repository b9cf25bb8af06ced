"""BGPO's bound against VRPO-OL (SPEC §2): equivalence on-policy, lower bound off-policy, accumulation;
group advantages; the baseline objectives."""
import copy
import math

import pytest
import torch

import bgpo
from bgpo import objectives

PROMPT = 3


def _rollout_batch(model, B=4, response=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.mask_token_id, (B, PROMPT + response), generator=g)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, PROMPT:] = True
    maskable[1, -2:] = False  # padding at the end of one response
    return ids, maskable


def _sample_inputs(model, ids, maskable, j, n_t, seed=42):
    """(hidden, LM head, targets, masked, elbo_weight) of MC sample j, at the response positions."""
    sample = bgpo.random_mask(ids, maskable, mask_id=model.mask_token_id, seed=seed, sample_index=j, num_samples=n_t)
    hidden = model.hidden_states(sample.noisy_ids)[:, PROMPT:]
    return hidden, model.lm_head_weight, ids[:, PROMPT:], sample.masked[:, PROMPT:], sample.elbo_weight


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


ADVANTAGES = torch.tensor([1.2, -0.5, 0.3, -1.0])


@pytest.mark.parametrize("old_given", [False, True])
def test_on_policy_bgpo_equals_vrpo_in_value_and_gradient(tiny_lm, old_given):
    ids, maskable = _rollout_batch(tiny_lm)
    n_t = 4
    old = None
    if old_given:  # θ_old = θ: ℓ_old computed without grad on the same samples
        with torch.no_grad():
            old = [bgpo.fused_elbo(*_sample_inputs(tiny_lm, ids, maskable, j, n_t)) for j in range(n_t)]

    bgpo_value = 0.0
    for j in range(n_t):  # one sample at a time: forward, backward, free
        out = bgpo.fused_elbo_loss(*_sample_inputs(tiny_lm, ids, maskable, j, n_t), ADVANTAGES,
                                   None if old is None else old[j], num_samples=n_t)
        out.loss.backward()
        bgpo_value += out.loss.item()
    bgpo_grads = _grads(tiny_lm)
    tiny_lm.zero_grad()

    elbos = torch.stack([bgpo.fused_elbo(*_sample_inputs(tiny_lm, ids, maskable, j, n_t)) for j in range(n_t)])
    vrpo = objectives.vrpo_loss(elbos, ADVANTAGES, None if old is None else torch.stack(old))
    vrpo.backward()

    expected = -ADVANTAGES.sum().item() / 4  # on-policy both equal A, averaged over D = 4 responses
    assert bgpo_value == pytest.approx(expected, abs=1e-6)
    assert vrpo.item() == pytest.approx(expected, abs=1e-6)
    for name, p in tiny_lm.named_parameters():
        assert torch.allclose(bgpo_grads[name], p.grad, rtol=1e-5, atol=1e-7), name
    assert any(g.abs().sum() > 0 for g in bgpo_grads.values())


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])
def test_bound_is_below_vrpo_off_policy(scale):
    n_t, B = 8, 64
    g = torch.Generator().manual_seed(int(scale * 10))
    old = torch.randn(n_t, B, generator=g) * 5
    elbos = old + torch.randn(n_t, B, generator=g) * scale
    advantages = torch.randn(B, generator=g) * 2
    bound = sum(objectives.bgpo_bound(elbos[j], advantages, old[j], num_samples=n_t, max_log_ratio=None)
                for j in range(n_t))
    exact = torch.exp((elbos - old).mean(0)) * advantages
    assert (bound <= exact + 1e-5 * exact.abs().clamp_min(1)).all()
    assert (advantages > 0).any() and (advantages < 0).any()
    # and the losses, which negate the objectives and divide by D, are ordered the other way
    bgpo_loss = sum(objectives.bgpo_loss(elbos[j], advantages, old[j], num_samples=n_t, max_log_ratio=None)
                    for j in range(n_t))
    assert bgpo_loss >= objectives.vrpo_loss(elbos, advantages, old, max_log_ratio=None) - 1e-5


def test_per_sample_bound_weight():
    """∂g_j/∂ℓ_j = A/n_t for A >= 0 and A e^{d_j}/n_t for A < 0 (the coefficient the fused backward applies)."""
    n_t = 4
    old = torch.tensor([0.0, 1.0, -2.0, 0.5])
    elbo = torch.tensor([0.3, 0.2, -1.0, 0.5], requires_grad=True)
    advantages = torch.tensor([2.0, -1.5, -0.5, 0.0])
    objectives.bgpo_bound(elbo, advantages, old, num_samples=n_t).sum().backward()
    d = elbo.detach() - old
    expected = torch.where(advantages >= 0, advantages, advantages * d.exp()) / n_t
    assert torch.allclose(elbo.grad, expected)


def test_per_sample_backward_accumulates_to_the_summed_gradient(tiny_lm):
    ids, maskable = _rollout_batch(tiny_lm, B=4)
    n_t = 8
    old_model = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        for p in old_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        old = [bgpo.fused_elbo(*_sample_inputs(old_model, ids, maskable, j, n_t)) for j in range(n_t)]

    for j in range(n_t):
        bgpo.fused_elbo_loss(*_sample_inputs(tiny_lm, ids, maskable, j, n_t), ADVANTAGES, old[j],
                             num_samples=n_t).loss.backward()
    accumulated = _grads(tiny_lm)
    tiny_lm.zero_grad()
    total = sum(bgpo.fused_elbo_loss(*_sample_inputs(tiny_lm, ids, maskable, j, n_t), ADVANTAGES, old[j],
                                     num_samples=n_t).loss for j in range(n_t))
    total.backward()
    for name, p in tiny_lm.named_parameters():
        assert torch.allclose(accumulated[name], p.grad, rtol=1e-5, atol=1e-7), name
    assert any((torch.stack(old) != 0).flatten())


def test_micro_batches_sum_to_the_batch_loss(tiny_lm):
    ids, maskable = _rollout_batch(tiny_lm, B=4)
    hidden, head, targets, masked, weight = _sample_inputs(tiny_lm, ids, maskable, 0, 2)
    full = bgpo.fused_elbo_loss(hidden, head, targets, masked, weight, ADVANTAGES, num_samples=2).loss
    halves = [bgpo.fused_elbo_loss(hidden[s], head, targets[s], masked[s], weight[s], ADVANTAGES[s], num_samples=2,
                                   denom=4).loss
              for s in (slice(0, 2), slice(2, 4))]
    assert torch.allclose(full, halves[0] + halves[1])


def test_clip_and_clamp_options():
    old = torch.zeros(4)
    elbo = torch.tensor([0.5, -0.5, 0.5, 20.0], requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    g = objectives.bgpo_bound(elbo, advantages, old, num_samples=1, clip=(0.2, 0.2))
    # A > 0, ratio 1.5 clipped to 1.2: min(1.5, 1.2) = 1.2, no gradient; ratio 0.5 < 0.8: min(0.5, 0.8) = 0.5
    assert g[0].item() == pytest.approx(1.2) and g[1].item() == pytest.approx(0.5)
    # A < 0: min(-e^0.5, -1.2) = -e^0.5 (unclipped, gradient flows); d = 20 clamped to 10, then clipped
    assert g[2].item() == pytest.approx(-math.exp(0.5))
    g.sum().backward()
    assert elbo.grad[0] == 0 and elbo.grad[1] == 1 and elbo.grad[2] == pytest.approx(-math.exp(0.5))
    unclamped = objectives.bgpo_bound(torch.tensor([200.0]), torch.tensor([-1.0]), torch.zeros(1),
                                      num_samples=1, max_log_ratio=None)
    assert torch.isinf(unclamped).all()
    clamped = objectives.bgpo_bound(torch.tensor([200.0]), torch.tensor([-1.0]), torch.zeros(1), num_samples=1)
    assert clamped.item() == pytest.approx(-math.exp(objectives.MAX_LOG_RATIO))


def test_large_d_with_positive_advantage_has_finite_gradient():
    elbo = torch.tensor([1e4], requires_grad=True)
    objectives.bgpo_bound(elbo, torch.tensor([1.0]), torch.zeros(1), num_samples=1, max_log_ratio=None).sum().backward()
    assert torch.isfinite(elbo.grad).all() and elbo.grad.item() == 1.0


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = bgpo.group_advantages(rewards, 4)
    g = rewards[:4]
    assert torch.allclose(a[:4], (g - g.mean()) / (g.std() + 1e-6))
    assert torch.equal(a[4:], torch.zeros(4))  # equal rewards: A = 0 exactly
    pop = bgpo.group_advantages(rewards, 4, std="population")
    assert torch.allclose(pop[:4], (g - g.mean()) / (g.std(correction=0) + 1e-6))
    assert torch.allclose(bgpo.group_advantages(rewards, 4, std="none")[:4], g - g.mean())
    assert torch.equal(bgpo.group_advantages(torch.tensor([0.3, 0.7]), 1), torch.zeros(2))
    for kwargs, name in [(dict(group_size=3), "rewards"), (dict(group_size=4, std="mad"), "std"),
                         (dict(group_size=0), "group_size")]:
        with pytest.raises(ValueError, match=name):
            bgpo.group_advantages(rewards, **kwargs)
    with pytest.raises(ValueError, match="rewards"):
        bgpo.group_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_diffu_grpo_on_policy_value_gradient_and_clipping():
    B, T = 3, 5
    logp = torch.randn(B, T).clamp(max=-0.1).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3:] = False
    advantages = torch.tensor([1.0, -2.0, 0.5])
    loss = bgpo.diffu_grpo_loss(logp, advantages, mask, beta=0.0)
    assert loss.item() == pytest.approx(-advantages.sum().item() / B)
    loss.backward()
    expected = -(advantages[:, None] * mask / mask.sum(1, keepdim=True)) / B
    assert torch.allclose(logp.grad, expected)
    # a ratio beyond 1 + ε with A > 0 is clipped: no gradient
    old = logp.detach() - 1.0  # ratio e ≈ 2.7 > 1.5
    logp.grad = None
    bgpo.diffu_grpo_loss(logp, torch.ones(B), mask, old_logp=old, beta=0.0).backward()
    assert torch.equal(logp.grad, torch.zeros(B, T))
    # k3 KL: zero at the reference, positive away from it
    at_ref = bgpo.diffu_grpo_loss(logp, torch.zeros(B), mask, ref_logp=logp.detach(), beta=0.04)
    away = bgpo.diffu_grpo_loss(logp, torch.zeros(B), mask, ref_logp=logp.detach() - 0.5, beta=0.04)
    assert at_ref.item() == pytest.approx(0.0, abs=1e-7) and away.item() > 0
    with pytest.raises(ValueError, match="ref_logp"):
        bgpo.diffu_grpo_loss(logp, advantages, mask)


def test_one_step_mask_masks_all_response_and_some_prompt():
    ids = torch.randint(0, 50, (64, 30))
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[:, :20] = True
    response = ~prompt
    noisy = bgpo.one_step_mask(ids, prompt, response, mask_id=99, seed=1)
    assert (noisy[:, 20:] == 99).all()
    frac = (noisy[:, :20] == 99).float().mean().item()
    assert 0.1 < frac < 0.2
    assert torch.equal(noisy, bgpo.one_step_mask(ids, prompt, response, mask_id=99, seed=1))
    assert not torch.equal(noisy, bgpo.one_step_mask(ids, prompt, response, mask_id=99, seed=1, iteration=1))


def test_spg_bounds():
    g = torch.Generator().manual_seed(3)
    elbos = torch.randn(6, 8, generator=g) * 2 - 5
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.0])
    lower = elbos.mean(0)
    upper = (torch.logsumexp(1.5 * elbos, 0) - math.log(6)) / 1.5
    assert (upper >= lower).all()  # the EUBO estimate sits above the ELBO (Jensen)
    for negative, log_p_neg in [("elbo", lower), ("eubo", upper), ("mixture", 0.5 * upper + 0.5 * lower)]:
        loss = bgpo.spg_loss(elbos, advantages, negative=negative, beta=1.5)
        log_p = torch.where(advantages > 0, lower, log_p_neg)
        assert loss.item() == pytest.approx(-(advantages * log_p).sum().item() / 8, rel=1e-5)


def test_wd1_is_linear_in_the_samples():
    g = torch.Generator().manual_seed(5)
    elbos = torch.randn(4, 8, generator=g)
    advantages = torch.randn(8, generator=g)
    weights = objectives.wd1_weights(advantages, group_size=4)
    assert torch.allclose(weights.view(2, 4).sum(1), torch.zeros(2), atol=1e-6)
    per_sample = sum(bgpo.wd1_loss(elbos[j], advantages, group_size=4, num_samples=4) for j in range(4))
    assert torch.allclose(per_sample, bgpo.wd1_loss(elbos.mean(0), advantages, group_size=4))
    # positive advantages get more weight on log π (pushed up) than negative ones
    assert weights[advantages.argmax()] > 0 > weights[advantages.argmin()]


def test_objective_argument_errors():
    e = torch.zeros(3)
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="num_samples"):
        objectives.bgpo_loss(e, a, num_samples=0)
    with pytest.raises(ValueError, match="denom"):
        objectives.bgpo_loss(e, a, num_samples=1, denom=0)
    with pytest.raises(ValueError, match="clip"):
        objectives.bgpo_loss(e, a, num_samples=1, clip=(1.5, 0.2))
    with pytest.raises(ValueError, match="advantages"):
        objectives.bgpo_loss(e, torch.tensor([0.0, float("inf"), 0.0]), num_samples=1)
    with pytest.raises(ValueError, match="old_elbo"):
        objectives.bgpo_loss(e, a, torch.zeros(2), num_samples=1)
    with pytest.raises(ValueError, match="objective"):
        objectives.per_sample_loss(e, a, objective="vrpo", num_samples=1)


def test_elbo_kl_is_k3_of_the_elbo_log_ratio_and_its_gradient_pulls_toward_the_reference():
    elbo = torch.tensor([-3.0, -1.0, -2.5], requires_grad=True)
    ref = torch.tensor([-2.0, -1.5, -2.5])
    n_t, beta = 4, 0.3
    kl = objectives.elbo_kl(elbo, ref, num_samples=n_t, denom=5)
    x = ref - elbo.detach()
    torch.testing.assert_close(kl, (torch.exp(x) - x - 1).sum() / (n_t * 5))
    loss = objectives.per_sample_loss(elbo, torch.zeros(3), objective="bgpo", num_samples=n_t, denom=5,
                                      ref_elbo=ref, beta=beta)
    loss.backward()
    # ∂/∂ℓ of β k3(ref - ℓ)/(n_t D) = β (1 - e^x)/(n_t D): negative (pull up) where ℓ < ref, 0 at ℓ = ref
    torch.testing.assert_close(elbo.grad, beta * (1 - torch.exp(x)) / (n_t * 5))
    assert elbo.grad[0] < 0 < elbo.grad[1] and elbo.grad[2] == 0


def test_kl_needs_a_reference_and_a_non_negative_beta():
    elbo, a = torch.zeros(2), torch.zeros(2)
    with pytest.raises(ValueError, match="ref_elbo: required when beta > 0"):
        objectives.per_sample_loss(elbo, a, objective="bgpo", num_samples=1, beta=0.1)
    with pytest.raises(ValueError, match="beta: expected a finite number >= 0"):
        objectives.per_sample_loss(elbo, a, objective="bgpo", num_samples=1, ref_elbo=elbo, beta=-1.0)
    with pytest.raises(ValueError, match="ref_elbos: required when beta > 0"):
        objectives.vrpo_loss(torch.zeros(2, 2), a, beta=0.1)
    with pytest.raises(ValueError, match="ref_elbo: expected shape"):
        objectives.per_sample_loss(elbo, a, objective="elbo", num_samples=1, ref_elbo=torch.zeros(3), beta=0.1)


def test_on_policy_bgpo_equals_vrpo_with_the_kl_term(tiny_lm):
    """The KL is one term per sample, so the per-sample BGPO loss keeps VRPO-OL's value and gradient."""
    ids, maskable = _rollout_batch(tiny_lm)
    n_t, beta = 3, 0.5
    with torch.no_grad():  # a reference a little off the policy
        ref = [bgpo.fused_elbo(*_sample_inputs(tiny_lm, ids, maskable, j, n_t)) + 0.3 * (j - 1) for j in range(n_t)]
    value = 0.0
    for j in range(n_t):
        out = bgpo.fused_elbo_loss(*_sample_inputs(tiny_lm, ids, maskable, j, n_t), ADVANTAGES,
                                   num_samples=n_t, ref_elbo=ref[j], beta=beta)
        out.loss.backward()
        value += out.loss.item()
    per_sample = _grads(tiny_lm)
    tiny_lm.zero_grad()
    elbos = torch.stack([bgpo.fused_elbo(*_sample_inputs(tiny_lm, ids, maskable, j, n_t)) for j in range(n_t)])
    vrpo = objectives.vrpo_loss(elbos, ADVANTAGES, ref_elbos=torch.stack(ref), beta=beta)
    vrpo.backward()
    assert value == pytest.approx(vrpo.item(), rel=1e-5)
    assert vrpo.item() > -ADVANTAGES.sum().item() / 4  # the KL is positive off the reference
    for name, grad in _grads(tiny_lm).items():
        torch.testing.assert_close(per_sample[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_elbo_kl_keeps_pulling_back_beyond_max_log_ratio():
    """Regression: the log-ratio was clamped at max_log_ratio (10) inside k3, so the KL's gradient was exactly
    0 once the policy's ELBO fell more than 10 nats below the reference's -- where it should pull hardest.
    Beyond c, k3 is continued by its tangent: value k3(c) + (e^c - 1)(x - c), gradient e^c - 1."""
    c = objectives.MAX_LOG_RATIO
    ref = torch.zeros(3)
    elbo = torch.tensor([-9.9, -10.1, -30.0], requires_grad=True)  # x = ref - elbo = 9.9, 10.1, 30
    kl = objectives.elbo_kl(elbo, ref, num_samples=1, denom=1)
    kl.backward()
    tangent = lambda x: math.exp(c) - c - 1 + (math.exp(c) - 1) * (x - c)  # noqa: E731
    expected = (math.exp(9.9) - 9.9 - 1) + tangent(10.1) + tangent(30.0)
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    # dk3/dℓ = -(e^x - 1) up to c, then -(e^c - 1): never 0 where the policy has drifted
    assert elbo.grad.tolist() == pytest.approx([-(math.exp(9.9) - 1), -(math.exp(c) - 1), -(math.exp(c) - 1)],
                                               rel=1e-5)
    free = torch.tensor([-9.9, -10.1, -30.0], requires_grad=True)
    objectives.elbo_kl(free, ref, num_samples=1, denom=1, max_log_ratio=None).backward()
    assert free.grad[0].item() == pytest.approx(elbo.grad[0].item())  # below c: exactly k3
