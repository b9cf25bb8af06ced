"""bgpo.memory: the fake-tensor simulator agrees with the CPU allocator (within 10%), op by op and on a
model's forward and backward, so its LLaDA-8B figures can be trusted."""
import pytest
import torch

import bgpo
from conftest import measure_real_and_fake
from bgpo.models import LLaDAConfig, LLaDAModelLM, enable_activation_checkpointing
from bgpo.reference import fused_elbo_loss_reference


def _loss_inputs(dtype):
    def build():
        b, l, h, v = 4, 256, 128, 32000
        hidden = torch.randn(b, l, h, dtype=dtype, requires_grad=True)
        weight = (torch.randn(v, h, dtype=dtype) * 0.1).requires_grad_()
        return hidden, weight, torch.randint(0, v, (b, l)), torch.rand(b, l) < 0.7, torch.ones(b), torch.ones(b)
    return build


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [bgpo.fused_elbo_loss, fused_elbo_loss_reference], ids=["fused", "naive"])
@pytest.mark.parametrize("backward", [False, True])
def test_simulated_op_memory_matches_the_allocator(dtype, fn, backward):
    kwargs = dict(backend="torch") if fn is bgpo.fused_elbo_loss else {}

    def run(*args):
        out = fn(*args, num_samples=2, **kwargs)
        if backward:
            out.loss.backward()

    real, fake = measure_real_and_fake(_loss_inputs(dtype), run)
    assert abs(fake - real) <= 0.1 * real, (real, fake)


def test_simulated_model_step_matches_the_allocator():
    """Two MC samples of a tiny LLaDA with a 4096-token head (more masked rows than one row block of the
    torch backend's tiles: the simulator cannot know how many rows a mask selects, so it counts full blocks)."""
    def build():
        torch.manual_seed(0)
        model = LLaDAModelLM(LLaDAConfig.preset("tiny", vocab_size=4096, mask_token_id=4095, eos_token_id=4094,
                                                pad_token_id=4094))
        ids = torch.randint(0, 4000, (4, 96))
        return model, ids

    def run(model, ids):
        maskable = torch.zeros_like(ids, dtype=torch.bool)
        maskable[:, 32:] = True
        for j in range(2):
            sample = bgpo.random_mask(ids, maskable, mask_id=model.mask_token_id, seed=0, sample_index=j,
                                      num_samples=2)
            hidden = model.hidden_states(sample.noisy_ids)[:, 32:]
            bgpo.fused_elbo_loss(hidden, model.lm_head_weight, ids[:, 32:], sample.masked[:, 32:],
                                 sample.elbo_weight, torch.tensor([1.0, -1.0, 0.5, -0.5]), num_samples=2,
                                 backend="torch").loss.backward()

    real, fake = measure_real_and_fake(build, run)
    assert abs(fake - real) <= 0.1 * real, (real, fake)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
@pytest.mark.parametrize("objective", ["bgpo", "vrpo"])
def test_simulated_policy_update_matches_the_allocator(objective, checkpointing):
    """The step benchmarks/memory_vs_nt.py simulates for LLaDA-8B, on a tiny LLaDA whose LM head, as
    LLaDA's, is small beside the activations; as there, each parameter's gradient is dropped once
    accumulated (a reduce-scatter would free it).  (Under a dispatch mode autograd sums the gradients of
    a tensor used by several graphs out of place, so VRPO-OL's shared LM head costs the simulation one
    transient copy of its gradient that the real run adds in place: a small overestimate.)"""
    from bgpo.policy_update import PolicyBatch, accumulate_policy_gradient

    def build():
        torch.manual_seed(0)
        model = LLaDAModelLM(LLaDAConfig.preset("tiny", vocab_size=4096, mask_token_id=4095, eos_token_id=4094,
                                                pad_token_id=4094))
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        if checkpointing:  # as every LLaDA-8B config and the simulation by default
            enable_activation_checkpointing(model)
        batch = PolicyBatch(input_ids=torch.randint(0, 4000, (4, 96)), prompt_length=32,
                            response_mask=torch.ones(4, 64, dtype=torch.bool),
                            advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), sequence_ids=torch.arange(4))
        return model, batch

    def run(model, batch):
        accumulate_policy_gradient(model, batch, objective=objective, num_samples=3, seed=0, backend="torch")

    real, fake = measure_real_and_fake(build, run)
    assert abs(fake - real) <= 0.1 * real, (real, fake)
