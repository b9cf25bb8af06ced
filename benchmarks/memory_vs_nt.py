"""Peak memory and time of one full RL training step against the number of MC samples n_t.

For each objective (bgpo, vrpo, diffu_grpo) and each n_t, one step on the same model, data and masks:
every MC sample's forward and backward (``bgpo.policy_update.accumulate_policy_gradient``) and the
AdamW step.  Memory is measured by tracking real allocations (``bgpo.memory.track_peak_memory``: the
CPU allocator's events through the profiler, or the CUDA allocator's peak), in a run of its own; the
time is that of an untracked run.  BGPO back-propagates one sample at a time, so its peak stays flat;
VRPO-OL keeps every sample's graph until its non-linear loss, so its peak grows with n_t; diffu-GRPO's
one-step estimator has no n_t (its row is the same at every n_t).

    python benchmarks/memory_vs_nt.py                       # CPU, the "small" LLaDA-shaped preset
    python benchmarks/memory_vs_nt.py --device cuda --checkpoint PATH --dtype bfloat16 ...
    python benchmarks/memory_vs_nt.py --simulate llada-8b   # LLaDA-8B on fake tensors, per GPU

``--activation-checkpointing`` recomputes each transformer block in backward
(``bgpo.models.enable_activation_checkpointing``), as every LLaDA-8B config in ``configs/`` does: on by
default with ``--simulate``, off by default when measuring (``--no-activation-checkpointing`` /
``--activation-checkpointing`` override either); the JSON's config and the table say which.

``--simulate`` runs the same step on fake tensors (no memory, no compute) under
``bgpo.memory.track_fake_memory`` and reports the memory of one GPU:

* ``--finetune full`` (default): AdamW sharded over ``--gpus`` GPUs (FSDP-style: bf16 compute weights,
  fp32 master weights, gradients and AdamW moments, ``--state-bytes`` = 16 bytes per parameter,
  divided by the number of GPUs; each parameter's full gradient is freed once accumulated, as a
  reduce-scatter frees it);
* ``--finetune lora``: one GPU holding the frozen bf16 weights (2 bytes per parameter) and LoRA
  adapters of rank ``--lora-rank`` on every projection (peft), with ``--state-bytes`` per adapter
  parameter.

Activations are the simulated peak of the step for ``--micro-batch`` responses per GPU
(``bgpo.plan.simulate_step``, which ``bgpo plan`` searches over; ``--samples-per-forward`` k forwards
k of BGPO's MC samples at once).  The simulator agrees with the CPU allocator within 10%
(tests/test_memory.py, with and without activation checkpointing).

Writes a table to stdout, JSON and a PNG plot (``--out``, default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import bgpo
from bgpo.backends import resolve_backend
from bgpo.memory import track_peak_memory
from bgpo.models import LLaDAConfig, LLaDAModelLM, enable_activation_checkpointing
from bgpo.plan import Workload, simulate_step
from bgpo.policy_update import PolicyBatch, accumulate_policy_gradient

OBJECTIVES = ("bgpo", "vrpo", "diffu_grpo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--simulate", default=None, metavar="PRESET",
                   help="simulate a preset (e.g. llada-8b) on fake tensors instead of measuring")
    p.add_argument("--finetune", default="full", choices=["full", "lora"],
                   help="--simulate: full fine-tuning sharded over --gpus, or LoRA on one GPU")
    p.add_argument("--lora-rank", type=int, default=16, help="--simulate --finetune lora: adapter rank")
    p.add_argument("--gpus", type=int, default=8, help="--simulate: GPUs the weights and AdamW state are sharded over")
    p.add_argument("--micro-batch", type=int, default=2, help="--simulate: responses per GPU per backward")
    p.add_argument("--samples-per-forward", type=int, default=1,
                   help="--simulate, bgpo: MC samples per forward (e.g. the plan `bgpo plan` prints)")
    p.add_argument("--state-bytes", type=float, default=16.0,
                   help="--simulate: bytes per parameter of master weights + gradients + AdamW moments")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="--simulate: the GPU's memory, for the verdict")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward (default: on with --simulate, off otherwise)")
    p.add_argument("--preset", default="small", help="bgpo.models preset: tiny, small, llada-8b")
    p.add_argument("--checkpoint", default=None, help="a local LLaDA checkpoint directory instead of a preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--nt", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="n_t values")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="G: responses per prompt")
    p.add_argument("--prompt-length", type=int, default=None, help="default 32 (256 with --simulate)")
    p.add_argument("--response-length", type=int, default=None, help="default 96 (512 with --simulate)")
    p.add_argument("--backend", default="auto", help="fused_elbo_loss backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="directory for JSON and PNG")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.prompt_length = args.prompt_length or (256 if args.simulate else 32)
    args.response_length = args.response_length or (512 if args.simulate else 96)
    if args.activation_checkpointing is None:
        args.activation_checkpointing = bool(args.simulate)
    if args.simulate:
        args.dtype = "bfloat16"
        # what backend="auto" runs on CUDA tensors: the simulator counts the workspace that backend declares
        args.backend = resolve_backend("fused_elbo_loss", "auto", torch.device("cuda")).name
    return args


def build_model(args, device, dtype):
    if args.checkpoint:
        return LLaDAModelLM.from_pretrained(args.checkpoint, device=device, dtype=dtype)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LLaDAModelLM(LLaDAConfig.preset(args.preset))
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model.to(dtype)


def make_batch(args, model, device):
    """Random prompts and responses with group-wise rewards: the same batch for every run."""
    g = torch.Generator().manual_seed(args.seed)
    n = args.prompts * args.group
    vocab = model.mask_token_id  # token ids below the mask id
    ids = torch.randint(0, vocab, (n, args.prompt_length + args.response_length), generator=g)
    response_mask = torch.ones(n, args.response_length, dtype=torch.bool)
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    if args.group > 1:
        rewards[:: args.group] = 1.0 - rewards[1 :: args.group]  # no group with all-equal rewards
    return PolicyBatch(
        input_ids=ids.to(device), prompt_length=args.prompt_length, response_mask=response_mask.to(device),
        advantages=bgpo.group_advantages(rewards, args.group).to(device),
        sequence_ids=torch.arange(n, device=device), group_size=args.group,
    )


def one_step(model, optimizer, batch, objective, n_t, args):
    accumulate_policy_gradient(model, batch, objective=objective, num_samples=n_t, seed=args.seed,
                               backend=args.backend)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated between steps, as in a training loop


def measure(args, objective, n_t, device, dtype):
    model = build_model(args, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():  # allocate gradients and AdamW's state up front: the step measures steady state
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    batch = make_batch(args, model, device)
    static = 2 * sum(t.numel() * t.element_size() for t in model.parameters())  # parameters and gradients
    static += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if torch.is_tensor(t))
    start = time.perf_counter()
    one_step(model, optimizer, batch, objective, n_t, args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    with track_peak_memory(device) as mem:
        one_step(model, optimizer, batch, objective, n_t, args)
    return {"objective": objective, "n_t": n_t, "peak_step_mib": mem.peak_mib, "static_mib": static / 2**20,
            "peak_total_mib": (static + mem.peak_bytes) / 2**20, "step_seconds": seconds}


def simulate(args, objective, n_t):
    """One GPU's share of a step of ``args.simulate`` on fake tensors: (static, activation peak) in bytes."""
    work = Workload(preset=args.simulate, objective=objective, num_samples=n_t, responses=args.micro_batch,
                    group_size=args.micro_batch, prompt_length=args.prompt_length,
                    response_length=args.response_length, finetune=args.finetune, lora_rank=args.lora_rank,
                    gpus=args.gpus, state_bytes=args.state_bytes, dtype="bfloat16",  # LLaDA computes in bf16
                    backend=args.backend)
    k = min(args.samples_per_forward, n_t) if objective == "bgpo" else 1
    return simulate_step(work, micro_batch_size=args.micro_batch, num_samples=n_t, samples_per_forward=k,
                         activation_checkpointing=args.activation_checkpointing)


def run_simulation(args):
    nts = sorted(set(args.nt))
    runs = [(o, n) for o in args.objectives for n in (nts if o != "diffu_grpo" else nts[:1])]
    rows = []
    for objective, n_t in progress(runs):
        static, peak = simulate(args, objective, n_t)
        rows.append({"objective": objective, "n_t": n_t, "peak_step_mib": peak / 2**20, "static_mib": static / 2**20,
                     "peak_total_mib": (static + peak) / 2**20, "step_seconds": float("nan")})
    rows += [{**r, "n_t": n} for r in rows if r["objective"] == "diffu_grpo" for n in nts[1:]]
    where = f"LoRA rank {args.lora_rank} on one GPU: frozen weights and adapter state" if args.finetune == "lora" \
        else f"one of {args.gpus} GPUs: sharded state"
    print(f"\nsimulated {args.simulate}, {where} "
          f"{rows[0]['static_mib'] / 1024:.1f} GiB + activations of {args.micro_batch} responses "
          f"x {args.samples_per_forward} MC samples per forward (bgpo) "
          f"(prompt {args.prompt_length}, response {args.response_length}, bf16, "
          f"{_checkpointing(args)}, fused_elbo_loss backend {args.backend!r}); total GiB")
    print(f"{'n_t':>5} " + " ".join(f"{o:>12}" for o in args.objectives))
    by = {(r["objective"], r["n_t"]): r for r in rows}
    for n_t in nts:
        print(f"{n_t:>5} " + " ".join(f"{by[o, n_t]['peak_total_mib'] / 1024:>12.1f}" for o in args.objectives))
    limit = args.gpu_memory_gib * 1024
    for o in args.objectives:
        over = [n for n in nts if by[o, n]["peak_total_mib"] > limit]
        verdict = f"exceeds {args.gpu_memory_gib:g} GiB from n_t = {over[0]}" if over else \
            f"fits in {args.gpu_memory_gib:g} GiB up to n_t = {nts[-1]}"
        print(f"{o}: {verdict}")
    return rows


def progress(items):
    try:
        from tqdm import tqdm

        return tqdm(items, desc="memory_vs_nt", file=sys.stderr)
    except ImportError:
        return items


def _checkpointing(args) -> str:
    return "activation checkpointing " + ("on" if args.activation_checkpointing else "off")


def print_table(rows, nts, objectives, args):
    by = {(r["objective"], r["n_t"]): r for r in rows}
    print(f"\npeak memory of one step above parameters, gradients and AdamW state, MiB (time, s); "
          f"{_checkpointing(args)}")
    print(f"{'n_t':>5} " + " ".join(f"{o:>22}" for o in objectives))
    for n_t in nts:
        cells = [f"{by[o, n_t]['peak_step_mib']:10.1f} ({by[o, n_t]['step_seconds']:6.2f} s)" for o in objectives]
        print(f"{n_t:>5} " + " ".join(f"{c:>22}" for c in cells))


def plot(rows, objectives, path, limit_mib=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = max(r["peak_total_mib"] for r in rows) > 10 * 1024
    scale, unit = (1024, "GiB") if gib else (1, "MiB")
    fig, ax = plt.subplots(figsize=(6, 4))
    for o in objectives:
        pts = sorted((r["n_t"], r["peak_total_mib"] / scale) for r in rows if r["objective"] == o)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=o)
    if limit_mib is not None:
        ax.axhline(limit_mib / scale, color="red", linestyle="--", label=f"{limit_mib / 1024:g} GiB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MC samples per response, n_t")
    ax.set_ylabel(f"peak memory of a training step, {unit}")
    ax.set_title("Memory against n_t (params, grads, AdamW, activations)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_measurement(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; run with --device cpu")
    dtype = getattr(torch, args.dtype)
    nts = sorted(set(args.nt))
    runs = [(o, n) for o in args.objectives for n in (nts if o != "diffu_grpo" else nts[:1])]
    measure(args, args.objectives[0], nts[0], device, dtype)  # warm-up: one-time costs out of the first timing
    rows = [measure(args, o, n, device, dtype) for o, n in progress(runs)]
    # diffu-GRPO does not depend on n_t: its one measured step stands for every n_t.
    rows += [{**r, "n_t": n} for r in rows if r["objective"] == "diffu_grpo" for n in nts[1:]]
    print_table(rows, nts, args.objectives, args)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.simulate:
        rows = run_simulation(args)
        stem = f"memory_vs_nt_simulated_{args.simulate}" + ("_lora" if args.finetune == "lora" else "")
    else:
        rows = run_measurement(args)
        name = args.checkpoint and Path(args.checkpoint).name or args.preset
        stem = f"memory_vs_nt_{args.device.split(':')[0]}_{name}"
    stem += "_ac" if args.activation_checkpointing else ""
    stem += f"_k{args.samples_per_forward}" if args.simulate and args.samples_per_forward > 1 else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = vars(args) | {"torch": torch.__version__, "machine": platform.machine()}
    (out / f"{stem}.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    print(f"\nwrote {out / f'{stem}.json'}")
    if not args.no_plot:
        plot(rows, args.objectives, out / f"{stem}.png", args.gpu_memory_gib * 1024 if args.simulate else None)
        print(f"wrote {out / f'{stem}.png'}")
    return rows


if __name__ == "__main__":
    main()
