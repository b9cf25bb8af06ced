"""Plan the RL update to fill a GPU memory budget: micro-batch size, MC samples per forward and activation
checkpointing, chosen on the fake-tensor simulator (``bgpo.memory.track_fake_memory``).

One GPU's memory in a step is ``static + activations``:

* ``static``: full fine-tuning shards ``state_bytes`` per parameter (master weights, gradients, AdamW
  moments; 16 for fp32 state) over ``gpus``; LoRA keeps the frozen weights (their dtype's bytes) resident
  on one GPU plus ``state_bytes`` per adapter parameter.
* ``activations``: the simulated peak of ``accumulate_policy_gradient`` for one micro-batch of the plan on
  fake tensors (no memory, no compute), each gradient dropped once accumulated (a reduce-scatter, or the
  in-place accumulation into a preallocated ``.grad``, frees it).

For ``bgpo`` and ``wd1`` the activations of a step are those of one forward of ``micro_batch_size *
samples_per_forward`` rows whatever n_t (each backward frees its graph), so one forward is simulated;
``vrpo`` and ``spg`` keep n_t graphs alive (simulated at
n_t, one sample per forward); ``diffu_grpo`` has one forward.

The planner maximises tokens per forward, ``rows * (prompt + response)`` with ``rows = micro_batch_size *
samples_per_forward``; the activations grow with ``rows``, so for each checkpointing setting a search on
``rows`` (linear interpolation, bisection as a fallback) finds the largest that fits, and the plan is
the one with the most tokens (ties: without checkpointing, which saves a second forward per block; then
the larger micro-batch).
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass

import torch

from .ops._checks import check_int

__all__ = ["Workload", "Plan", "simulate_step", "plan_update", "workload_from_config", "format_plan", "main"]

GIB = 2**30


@dataclass(frozen=True)
class Workload:
    """What one GPU runs in one RL update, and how its weights and optimizer state are held."""

    preset: str = "llada-8b"  # a bgpo.models preset
    objective: str = "bgpo"
    num_samples: int = 16  # n_t
    responses: int = 16  # responses per GPU per update
    group_size: int = 8  # G (wd1's micro-batches hold whole groups)
    prompt_length: int = 256
    response_length: int = 512
    finetune: str = "full"  # "full" (sharded over gpus) or "lora" (one GPU)
    lora_rank: int = 16
    gpus: int = 8
    state_bytes: float = 16.0
    dtype: str = "bfloat16"
    overrides: tuple = ()  # ((field, value), ...): LLaDAConfig fields replacing the preset's
    backend: str = "torch"  # the fused_elbo_loss backend whose declared workspace is counted

    def __post_init__(self):
        from .policy_update import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if self.finetune not in ("full", "lora"):
            raise ValueError(f"finetune: expected 'full' or 'lora', got {self.finetune!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        for name in ("num_samples", "responses", "group_size", "prompt_length", "response_length", "lora_rank",
                     "gpus"):
            check_int(name, getattr(self, name), low=1)
        if not self.state_bytes > 0:
            raise ValueError(f"state_bytes: expected a positive number, got {self.state_bytes!r}")
        if self.objective == "wd1" and self.responses % self.group_size:
            raise ValueError(f"responses: wd1 needs whole groups, a multiple of group_size={self.group_size}")

    @property
    def linear(self) -> bool:
        from .policy_update import LINEAR_OBJECTIVES

        return self.objective in LINEAR_OBJECTIVES


@dataclass(frozen=True)
class Plan:
    micro_batch_size: int
    samples_per_forward: int
    activation_checkpointing: bool
    static_bytes: int
    activation_bytes: int
    tokens_per_forward: int

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + self.activation_bytes


def _build_model(work: Workload, activation_checkpointing: bool):
    """(model, its fake mode, static bytes): the workload's model on fake CPU tensors, each gradient
    dropped once accumulated (a reduce-scatter, or the in-place accumulation into ``.grad``, frees it)."""
    return _fake_model(work.preset, work.overrides, work.finetune, work.lora_rank, work.gpus, work.state_bytes,
                       work.dtype, activation_checkpointing)


@functools.lru_cache(maxsize=2)  # the planner simulates one model many times
def _fake_model(preset, overrides, finetune, lora_rank, gpus, state_bytes, dtype, activation_checkpointing):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .models import LLaDAConfig, LLaDAModelLM, enable_activation_checkpointing

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device("meta"):  # built on meta (peft moves adapters with .to(), which fake tensors refuse)
            model = LLaDAModelLM(LLaDAConfig.preset(preset, **dict(overrides)))
            if finetune == "lora":
                from .train.config import LoraConfig
                from .train.modeling import apply_lora

                apply_lora(model, LoraConfig(r=lora_rank), seed=0)
            if activation_checkpointing:
                enable_activation_checkpointing(model)
    finally:
        torch.set_default_dtype(default_dtype)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta parameters' shapes
    with mode:
        model.to_empty(device="cpu")  # fake CPU tensors: shapes and dtypes, no memory
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if finetune == "lora":
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        static = frozen + trainable * state_bytes
    else:
        static = trainable * state_bytes / gpus
    return model, mode, int(static)


def _batch(work: Workload, rows: int, mask_token_id: int):
    from .policy_update import PolicyBatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mask_token_id, (rows, work.prompt_length + work.response_length), generator=g)
    return PolicyBatch(input_ids=ids, prompt_length=work.prompt_length,
                       response_mask=torch.ones(rows, work.response_length, dtype=torch.bool),
                       advantages=torch.linspace(-1.0, 1.0, rows), sequence_ids=torch.arange(rows),
                       group_size=work.group_size if work.objective == "wd1" else 1)


def simulate_step(work: Workload, *, micro_batch_size: int, samples_per_forward: int = 1,
                  activation_checkpointing: bool = True, num_samples: int | None = None) -> tuple[int, int]:
    """(static bytes, activation peak bytes) of one GPU for one micro-batch of ``work``'s update.

    ``num_samples`` overrides the n_t simulated (default: one forward of ``samples_per_forward`` samples for
    bgpo and wd1, whose every forward peaks alike, the gradients being dropped; n_t for vrpo and spg).
    """
    from .memory import track_fake_memory
    from .policy_update import accumulate_policy_gradient

    check_int("micro_batch_size", micro_batch_size, low=1)
    check_int("samples_per_forward", samples_per_forward, low=1)
    if num_samples is None:
        num_samples = (min(work.num_samples, samples_per_forward) if work.linear
                       else 1 if work.objective == "diffu_grpo" else work.num_samples)
    model, mode, static = _build_model(work, activation_checkpointing)
    with mode:
        batch = _batch(work, micro_batch_size, model.mask_token_id)
        with track_fake_memory() as mem:
            accumulate_policy_gradient(model, batch, objective=work.objective, num_samples=num_samples, seed=0,
                                       backend=work.backend, samples_per_forward=samples_per_forward)
    return static, mem.peak_bytes


def _split(work: Workload, rows: int) -> tuple[int, int] | None:
    """(micro_batch_size, samples_per_forward) with the most rows <= ``rows`` (ties: the larger micro-batch)."""
    step = work.group_size if work.objective == "wd1" else 1
    best = None
    for micro in range(step, min(work.responses, rows) + 1, step):
        k = min(work.num_samples, rows // micro) if work.linear else 1
        if best is None or micro * k >= best[0] * best[1]:
            best = (micro, k)
    return best


def _largest_fit(simulate, lo: int, fits: Plan, max_rows: int, budget: float) -> Plan:
    """The plan of the most rows in [lo, max_rows] that fits, ``fits`` being that of ``lo``.

    Memory grows with rows, about linearly (activations are rows x length x width), so the search
    interpolates linearly between the largest row count that fits and the smallest that does not
    (a few simulations, each costing one fake forward and backward), and bisects instead whenever an
    interpolation step did not halve the interval, which bounds it by twice bisection's count."""
    top = simulate(max_rows)
    if top.peak_bytes <= budget:
        return top
    hi, peak_lo, peak_hi, interpolate = max_rows, fits.peak_bytes, top.peak_bytes, True
    while hi - lo > 1:
        width = hi - lo
        if interpolate and peak_hi > peak_lo:
            mid = lo + int((budget - peak_lo) * width / (peak_hi - peak_lo))
        else:
            mid = (lo + hi) // 2
        mid = min(max(mid, lo + 1), hi - 1)
        candidate = simulate(mid)
        if candidate.peak_bytes <= budget:
            lo, peak_lo, fits = mid, candidate.peak_bytes, candidate
        else:
            hi, peak_hi = mid, candidate.peak_bytes
        interpolate = hi - lo <= width // 2
    return fits


def _rows(split: tuple[int, int]) -> int:
    return split[0] * split[1]


def plan_update(work: Workload, budget_gib: float, *, checkpointing=(False, True), log=None) -> Plan:
    """The plan with the most tokens per forward whose simulated peak fits ``budget_gib``; ValueError
    saying what to change when none fits."""
    if not budget_gib > 0:
        raise ValueError(f"budget_gib: expected a positive number of GiB, got {budget_gib!r}")
    budget = budget_gib * GIB
    max_rows = work.responses * (work.num_samples if work.linear else 1)
    low_rows = work.group_size if work.objective == "wd1" else 1
    plans, smallest, simulated = [], None, {}

    def simulate(rows: int, ac: bool) -> Plan:
        split = _split(work, rows)
        if (split, ac) not in simulated:
            micro, k = split
            static, act = simulate_step(work, micro_batch_size=micro, samples_per_forward=k,
                                        activation_checkpointing=ac)
            if log:
                log(f"  micro_batch_size={micro} samples_per_forward={k} activation_checkpointing={ac}: "
                    f"{(static + act) / GIB:.4g} GiB")
            simulated[split, ac] = Plan(micro, k, ac, static, act,
                                        micro * k * (work.prompt_length + work.response_length))
        return simulated[split, ac]

    for ac in checkpointing:
        if plans and plans[-1].micro_batch_size * plans[-1].samples_per_forward >= _rows(_split(work, max_rows)):
            break  # everything already fits in one forward without checkpointing
        # Checkpointing holds less than not at the same rows: start from what fitted without it.
        start = plans[-1].micro_batch_size * plans[-1].samples_per_forward if plans else low_rows
        plan = simulate(start, ac)
        if smallest is None or plan.peak_bytes < smallest.peak_bytes:
            smallest = plan
        if plan.peak_bytes > budget:
            continue
        plans.append(_largest_fit(lambda rows: simulate(rows, ac), start, plan, max_rows, budget))
    if not plans:
        raise ValueError(_no_fit(work, budget_gib, smallest))
    return max(plans, key=lambda p: (p.tokens_per_forward, not p.activation_checkpointing, p.micro_batch_size))


def _no_fit(work: Workload, budget_gib: float, smallest: Plan) -> str:
    fix = ("use more GPUs (--gpus) or LoRA (--finetune lora)" if work.finetune == "full" and
           smallest.static_bytes > 0.5 * budget_gib * GIB else
           "shorten the prompt or the response, or use LoRA" if work.finetune == "full" else
           "use a lower LoRA rank, shorter sequences or a larger GPU")
    if not work.linear and work.objective != "diffu_grpo":
        fix = f"lower n_t ({work.objective} keeps every MC sample's graph) or use bgpo; or " + fix
    wd1 = f" (wd1: a whole group of {work.group_size})" if work.objective == "wd1" else ""
    return (f"memory budget: {budget_gib:g} GiB cannot hold even the smallest plan{wd1}: "
            f"{smallest.peak_bytes / GIB:.2f} GiB (static {smallest.static_bytes / GIB:.2f} GiB + activations "
            f"{smallest.activation_bytes / GIB:.2f} GiB for micro_batch_size={smallest.micro_batch_size} "
            f"{'with' if smallest.activation_checkpointing else 'without'} "
            f"activation checkpointing); {fix}")


def workload_from_config(config, world_size: int = 1, sharded: bool = False, device: str = "cpu") -> Workload:
    """The ``Workload`` of one rank of ``bgpo train`` (a validated ``TrainConfig``) on ``device``; ``sharded``:
    FSDP shards the state over ``world_size`` ranks.  Optimizer state: weights, gradients and AdamW's two moments in the
    parameters' dtype (4 x its bytes per parameter)."""
    import dataclasses

    from .backends import resolve_backend
    from .models import LLaDAConfig

    m, r, p = config.model, config.rollout, config.policy
    key = "policy.memory_budget_gib"
    if m.hf:
        raise ValueError(f"{key}: plans bgpo's LLaDA models (a preset or a LLaDA checkpoint), not model.hf")
    if config.data.max_prompt_length is None:
        raise ValueError(f"{key}: needs data.max_prompt_length (the longest prompt the plan must hold)")
    overrides = m.overrides if m.path is None else dataclasses.asdict(LLaDAConfig.from_json(m.path))
    return Workload(
        preset=m.preset, overrides=tuple(sorted(overrides.items())), objective=p.objective,
        num_samples=p.num_samples, responses=config.batch_size // world_size * r.group_size, group_size=r.group_size,
        prompt_length=config.data.max_prompt_length, response_length=r.gen_length,
        finetune="lora" if config.lora.enabled else "full", lora_rank=config.lora.r,
        gpus=world_size if sharded else 1, state_bytes=4.0 * getattr(torch, m.dtype).itemsize, dtype=m.dtype,
        backend=resolve_backend("fused_elbo_loss", p.backend, torch.device(device)).name,
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def format_plan(work: Workload, plan: Plan, budget_gib: float) -> str:
    return "\n".join([
        f"plan for {work.preset} ({work.finetune}{f' rank {work.lora_rank}' if work.finetune == 'lora' else ''}"
        f"{f', state sharded over {work.gpus} GPU(s)' if work.finetune == 'full' else ''}), {work.objective}, "
        f"n_t={work.num_samples}, "
        f"{work.responses} responses per GPU, prompt {work.prompt_length} + response {work.response_length}, "
        f"{work.dtype}, budget {budget_gib:g} GiB:",
        f"  policy.micro_batch_size: {plan.micro_batch_size}",
        f"  policy.samples_per_forward: {plan.samples_per_forward}",
        f"  model.activation_checkpointing: {str(plan.activation_checkpointing).lower()}",
        f"  tokens per forward: {plan.tokens_per_forward}",
        f"  predicted peak: {_size(plan.peak_bytes)} (static {_size(plan.static_bytes)} + "
        f"activations {_size(plan.activation_bytes)})",
    ])


def main(argv: list[str] | None = None, prog: str = "bgpo plan") -> int:
    defaults = Workload()
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", type=float, required=True, help="GPU memory budget, GiB")
    p.add_argument("--preset", default=defaults.preset, help="bgpo.models preset (tiny, small, llada-8b)")
    p.add_argument("--objective", default=defaults.objective)
    p.add_argument("--nt", type=int, default=defaults.num_samples, help="n_t, MC samples per response")
    p.add_argument("--responses", type=int, default=defaults.responses, help="responses per GPU per update")
    p.add_argument("--group", type=int, default=defaults.group_size, help="G, responses per prompt")
    p.add_argument("--prompt-length", type=int, default=defaults.prompt_length)
    p.add_argument("--response-length", type=int, default=defaults.response_length)
    p.add_argument("--finetune", default=defaults.finetune, choices=["full", "lora"])
    p.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    p.add_argument("--gpus", type=int, default=defaults.gpus, help="full fine-tuning: GPUs the state is sharded over")
    p.add_argument("--state-bytes", type=float, default=defaults.state_bytes)
    p.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"])
    p.add_argument("--activation-checkpointing", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--backend", default=None,
                   help="fused_elbo_loss backend whose workspace is counted (default: what 'auto' runs on CUDA)")
    p.add_argument("--verbose", action="store_true", help="print every simulated candidate")
    args = p.parse_args(argv)
    checkpointing = {"auto": (False, True), "on": (True,), "off": (False,)}[args.activation_checkpointing]
    if args.backend is None:
        from .backends import resolve_backend

        args.backend = resolve_backend("fused_elbo_loss", "auto", torch.device("cuda")).name
    try:
        work = Workload(args.preset, args.objective, args.nt, args.responses, args.group, args.prompt_length,
                        args.response_length, args.finetune, args.lora_rank, args.gpus, args.state_bytes, args.dtype,
                        backend=args.backend)
        plan = plan_update(work, args.memory, checkpointing=checkpointing,
                           log=(lambda line: print(line, file=sys.stderr)) if args.verbose else None)
    except ValueError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    print(format_plan(work, plan, args.memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
