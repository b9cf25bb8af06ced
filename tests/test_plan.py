"""bgpo.plan: the planner's chosen plan fits its budget, is the largest that does, its predicted peak matches
the CPU allocator (within 10%), and a budget nothing fits is refused with what to change."""
import pytest
import torch

from bgpo.memory import track_peak_memory
from bgpo.models import LLaDAConfig, LLaDAModelLM, enable_activation_checkpointing
from bgpo.plan import GIB, Workload, main, plan_update, simulate_step
from bgpo.policy_update import PolicyBatch, accumulate_policy_gradient

WORK = Workload(preset="tiny", num_samples=4, responses=4, group_size=2, prompt_length=8, response_length=56, gpus=1,
                dtype="float32")


def _measured_peak(work, plan):
    """Parameters, gradients and AdamW state of the real fp32 model, plus the measured peak of the update."""
    torch.manual_seed(0)
    model = LLaDAModelLM(LLaDAConfig.preset(work.preset))
    if plan.activation_checkpointing:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's state allocated up front
    static = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    static += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    n = work.responses
    batch = PolicyBatch(torch.randint(0, model.mask_token_id, (n, work.prompt_length + work.response_length)),
                        work.prompt_length, torch.ones(n, work.response_length, dtype=torch.bool),
                        torch.linspace(-1, 1, n), torch.arange(n))
    with track_peak_memory("cpu") as mem:
        accumulate_policy_gradient(model, batch, num_samples=work.num_samples, seed=0, backend="torch",
                                   micro_batch_size=plan.micro_batch_size,
                                   samples_per_forward=plan.samples_per_forward)
    return static + mem.peak_bytes


@pytest.mark.parametrize("budget_mib", [5, 9])
def test_the_chosen_plan_fits_is_maximal_and_matches_the_allocator(budget_mib):
    plan = plan_update(WORK, budget_mib / 1024)
    assert plan.peak_bytes <= budget_mib * 2**20
    rows = plan.micro_batch_size * plan.samples_per_forward
    assert 1 < rows < WORK.responses * WORK.num_samples  # the budget binds, yet more than one row fits
    # One more row (as a larger micro-batch or one more sample per forward) would not fit.
    micro, k = (plan.micro_batch_size + 1, plan.samples_per_forward) if plan.micro_batch_size < WORK.responses \
        else (plan.micro_batch_size, plan.samples_per_forward + 1)
    static, act = simulate_step(WORK, micro_batch_size=micro, samples_per_forward=k, activation_checkpointing=True)
    assert static + act > budget_mib * 2**20
    measured = _measured_peak(WORK, plan)
    assert abs(plan.peak_bytes - measured) <= 0.1 * measured, (plan, measured)


def test_checkpointing_is_only_chosen_when_it_buys_tokens():
    large = plan_update(WORK, 1.0)  # everything fits in one forward
    assert (large.micro_batch_size, large.samples_per_forward, large.activation_checkpointing) == (4, 4, False)


def test_an_objective_not_linear_in_the_samples_gets_one_sample_per_forward():
    plan = plan_update(Workload(**{**WORK.__dict__, "objective": "vrpo"}), 1.0)
    assert plan.samples_per_forward == 1 and plan.micro_batch_size == WORK.responses


def test_a_budget_nothing_fits_is_refused_saying_what_to_change():
    with pytest.raises(ValueError, match=r"memory budget: 0.001 GiB cannot hold even the smallest plan.*use more GPUs"):
        plan_update(WORK, 0.001)
    with pytest.raises(ValueError, match="budget_gib: expected a positive number"):
        plan_update(WORK, 0)


@pytest.mark.parametrize("change, argument", [({"objective": "ppo"}, "objective"), ({"num_samples": 0}, "num_samples"),
                                              ({"finetune": "qlora"}, "finetune"),
                                              ({"objective": "wd1", "responses": 3}, "responses")])
def test_bad_workload_names_the_argument(change, argument):
    with pytest.raises(ValueError, match=f"^{argument}: "):
        Workload(**{**WORK.__dict__, **change})


def test_bgpo_plan_command(capsys):
    from bgpo.cli import main as cli

    argv = ["--preset", "tiny", "--nt", "4", "--responses", "4", "--group", "2", "--prompt-length", "8",
            "--response-length", "56", "--gpus", "1", "--dtype", "float32"]
    assert cli(["plan", "--memory", "0.0088"] + argv) == 0
    out = capsys.readouterr().out
    assert "policy.micro_batch_size:" in out and "policy.samples_per_forward:" in out and "predicted peak" in out
    assert main(["--memory", "0.001"] + argv) == 2
    assert "cannot hold even the smallest plan" in capsys.readouterr().err
    assert GIB == 2**30


def test_the_trainer_plans_its_update_under_policy_memory_budget_gib(tmp_path):
    from test_train_loop import tiny_config

    from bgpo.plan import workload_from_config
    from bgpo.train import Trainer

    config = tiny_config(tmp_path, "policy.memory_budget_gib=0.004", "data.max_prompt_length=96")
    plan = plan_update(workload_from_config(config), 0.004)
    assert plan.activation_checkpointing and plan.micro_batch_size * plan.samples_per_forward > 1  # the budget binds
    trainer = Trainer(config)
    assert (trainer.micro_batch_size, trainer.samples_per_forward) == (plan.micro_batch_size, plan.samples_per_forward)
    assert trainer.train_step()["step"] == 1


@pytest.mark.parametrize("overrides, message", [
    (["policy.micro_batch_size=2"], "policy.memory_budget_gib: chooses policy.micro_batch_size"),
    ([], "policy.memory_budget_gib: .*needs data.max_prompt_length"),
    (["policy.memory_budget_gib=0"], "policy.memory_budget_gib: expected"),
])
def test_policy_memory_budget_gib_config_errors(tmp_path, overrides, message):
    from test_train_loop import tiny_config

    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, "policy.memory_budget_gib=1", *overrides).validate()
