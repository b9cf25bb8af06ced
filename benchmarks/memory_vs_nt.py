"""Peak memory and time of one full RL training step against the number of MC samples n_t.

For each objective (bgpo, vrpo, diffu_grpo) and each n_t, one step on the same model, data and masks:
every MC sample's forward and backward (``bgpo.policy_update.accumulate_policy_gradient``) and the
AdamW step.  Memory is measured by tracking real allocations (``bgpo.memory.track_peak_memory``: the
CPU allocator's events through the profiler, or the CUDA allocator's peak), in a run of its own; the
time is that of an untracked run.  BGPO back-propagates one sample at a time, so its peak stays flat;
VRPO-OL keeps every sample's graph until its non-linear loss, so its peak grows with n_t; diffu-GRPO's
one-step estimator has no n_t (its row is the same at every n_t).

    python benchmarks/memory_vs_nt.py                       # CPU, the "small" LLaDA-shaped preset
    python benchmarks/memory_vs_nt.py --device cuda --preset llada-8b --dtype bfloat16 ...

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
from bgpo.memory import track_peak_memory
from bgpo.models import LLaDAConfig, LLaDAModelLM
from bgpo.policy_update import PolicyBatch, accumulate_policy_gradient

OBJECTIVES = ("bgpo", "vrpo", "diffu_grpo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--preset", default="small", help="bgpo.models preset: tiny, small, llada-8b")
    p.add_argument("--checkpoint", default=None, help="a local LLaDA checkpoint directory instead of a preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--nt", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="n_t values")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="G: responses per prompt")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--response-length", type=int, default=96)
    p.add_argument("--backend", default="auto", help="fused_elbo_loss backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="directory for JSON and PNG")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def build_model(args, device, dtype):
    if args.checkpoint:
        return LLaDAModelLM.from_pretrained(args.checkpoint, device=device, dtype=dtype)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LLaDAModelLM(LLaDAConfig.preset(args.preset))
    return model.to(dtype)


def make_batch(args, model, device):
    """Random prompts and responses with group-wise rewards: the same batch for every run."""
    g = torch.Generator().manual_seed(args.seed)
    n = args.prompts * args.group
    vocab = model.mask_token_id  # token ids below the mask id
    ids = torch.randint(0, vocab, (n, args.prompt_length + args.response_length), generator=g)
    response_mask = torch.ones(n, args.response_length, dtype=torch.bool)
    rewards = torch.randint(0, 2, (n,), generator=g).float()
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


def progress(items):
    try:
        from tqdm import tqdm

        return tqdm(items, desc="memory_vs_nt", file=sys.stderr)
    except ImportError:
        return items


def print_table(rows, nts, objectives):
    by = {(r["objective"], r["n_t"]): r for r in rows}
    print("\npeak memory of one step above parameters, gradients and AdamW state, MiB (time, s)")
    print(f"{'n_t':>5} " + " ".join(f"{o:>22}" for o in objectives))
    for n_t in nts:
        cells = [f"{by[o, n_t]['peak_step_mib']:10.1f} ({by[o, n_t]['step_seconds']:6.2f} s)" for o in objectives]
        print(f"{n_t:>5} " + " ".join(f"{c:>22}" for c in cells))


def plot(rows, objectives, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for o in objectives:
        pts = sorted((r["n_t"], r["peak_total_mib"]) for r in rows if r["objective"] == o)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=o)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MC samples per response, n_t")
    ax.set_ylabel("peak memory of a training step, MiB")
    ax.set_title("Memory against n_t (params, grads, AdamW, activations)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; run with --device cpu")
    dtype = getattr(torch, args.dtype)
    nts = sorted(set(args.nt))
    runs = [(o, n) for o in args.objectives for n in (nts if o != "diffu_grpo" else nts[:1])]
    rows = [measure(args, o, n, device, dtype) for o, n in progress(runs)]
    # diffu-GRPO does not depend on n_t: its one measured step stands for every n_t.
    rows += [{**r, "n_t": n} for r in rows if r["objective"] == "diffu_grpo" for n in nts[1:]]
    print_table(rows, nts, args.objectives)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory_vs_nt_{device.type}_{args.checkpoint and Path(args.checkpoint).name or args.preset}"
    meta = {k: v for k, v in vars(args).items()} | {"torch": torch.__version__, "machine": platform.machine()}
    (out / f"{stem}.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    print(f"\nwrote {out / f'{stem}.json'}")
    if not args.no_plot:
        plot(rows, args.objectives, out / f"{stem}.png")
        print(f"wrote {out / f'{stem}.png'}")
    return rows


if __name__ == "__main__":
    main()
