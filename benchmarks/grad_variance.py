"""The paper's Figure 3 on a tiny model: bias and standard deviation of the policy gradient against n_t.

For each masking scheme and each n_t in 1 … 64, the on-policy BGPO gradient of one fixed batch is
computed with ``--repeats`` different mask seeds; the reference is the gradient at n_t = 256. Reported,
relative to the reference's norm:

    std(n_t)  = sqrt(mean_s ||g_s - mean_s g_s||²) / ||g_ref||
    bias(n_t) = ||mean_s g_s - g_ref|| / ||g_ref||

    python benchmarks/grad_variance.py            # about a minute on a CPU

Writes a table to stdout, JSON and a PNG plot (``--out``, default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import bgpo
from bgpo.models import LLaDAConfig, LLaDAModelLM
from bgpo.policy_update import PolicyBatch, accumulate_policy_gradient


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nt", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--reference-nt", type=int, default=256)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--schemes", nargs="+", default=["stratified", "bernoulli"], choices=["stratified", "bernoulli"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--responses", type=int, default=8)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def make_problem(args):
    torch.manual_seed(args.seed)
    model = LLaDAModelLM(LLaDAConfig.preset(args.preset))
    g = torch.Generator().manual_seed(args.seed)
    prompt = 8
    ids = torch.randint(0, model.mask_token_id, (args.responses, prompt + args.response_length), generator=g)
    rewards = torch.arange(args.responses, dtype=torch.float32) % 3
    batch = PolicyBatch(input_ids=ids, prompt_length=prompt,
                        response_mask=torch.ones(args.responses, args.response_length, dtype=torch.bool),
                        advantages=bgpo.group_advantages(rewards, args.responses),
                        sequence_ids=torch.arange(args.responses))
    return model, batch


def gradient(model, batch, n_t, seed, scheme):
    model.zero_grad(set_to_none=True)
    accumulate_policy_gradient(model, batch, objective="bgpo", num_samples=n_t, seed=seed, scheme=scheme)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main(argv=None):
    args = parse_args(argv)
    model, batch = make_problem(args)
    rows = []
    for scheme in args.schemes:
        reference = gradient(model, batch, args.reference_nt, seed=10**6, scheme=scheme)
        scale = reference.norm()
        for n_t in args.nt:
            grads = torch.stack([gradient(model, batch, n_t, seed=s, scheme=scheme) for s in range(args.repeats)])
            mean = grads.mean(0)
            std = ((grads - mean).square().sum(1).mean().sqrt() / scale).item()
            bias = ((mean - reference).norm() / scale).item()
            rows.append({"scheme": scheme, "n_t": n_t, "std": std, "bias": bias})
            print(f"{scheme:>10} n_t={n_t:>3}  std {std:.4f}  bias {bias:.4f}", file=sys.stderr)
    print(f"\ngradient std / bias relative to ||g(n_t={args.reference_nt})||, {args.repeats} seeds per point")
    print(f"{'n_t':>5} " + " ".join(f"{s + ' std':>16} {s + ' bias':>16}" for s in args.schemes))
    for n_t in args.nt:
        cells = [r for s in args.schemes for r in rows if r["scheme"] == s and r["n_t"] == n_t]
        print(f"{n_t:>5} " + " ".join(f"{r['std']:>16.4f} {r['bias']:>16.4f}" for r in cells))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_variance.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))
    print(f"\nwrote {out / 'grad_variance.json'}")
    if not args.no_plot:
        plot(rows, args.schemes, out / "grad_variance.png")
        print(f"wrote {out / 'grad_variance.png'}")
    return rows


def plot(rows, schemes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key in zip(axes, ("std", "bias")):
        for s in schemes:
            pts = sorted((r["n_t"], r[key]) for r in rows if r["scheme"] == s)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n_t")
        ax.set_ylabel(f"gradient {key} / ||g_ref||")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("BGPO policy gradient against n_t (tiny LLaDA)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
