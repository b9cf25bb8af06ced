"""One RL update padded vs packed (``accumulate_policy_gradient(pack_sequences=...)``): tokens per second,
peak memory and the gradient difference, on responses whose lengths spread over a range of the maximum
(as real rollouts' do: the tokens after a response's first EOS, and the prompts' left padding, are
padding that the padded update still computes).

    nice -n 10 python benchmarks/packing.py                 # CPU, the "small" preset, bgpo, n_t = 4

Response b of N has ``round(L * (lo + (hi - lo) * b / (N - 1)))`` valid tokens (``--spread lo hi``,
default 0.25 1.0), prompt b ``round(P * (0.5 + 0.5 * b / (N - 1)))`` (left-padded to P), rows shuffled
so every micro-batch holds short and long ones.  Tokens per second counts the real tokens (prompt and
response) of the batch, the same number in both runs, over the median time of ``--repeats`` untracked
updates; the peak is that of one update under ``bgpo.memory.track_peak_memory``, in a run of its own.

Writes a table to stdout and JSON to ``--out`` (default benchmarks/results/packing_<device>_<preset>.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bgpo.memory import track_peak_memory
from bgpo.models import LLaDAConfig, LLaDAModelLM
from bgpo.policy_update import OBJECTIVES, PolicyBatch, accumulate_policy_gradient


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="small", help="bgpo.models preset: tiny, small")
    p.add_argument("--objective", default="bgpo", choices=OBJECTIVES[:2] + OBJECTIVES[3:])
    p.add_argument("--responses", type=int, default=8, help="N: responses in the update")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--nt", type=int, default=4, help="MC samples per response")
    p.add_argument("--prompt-length", type=int, default=64, help="P: the longest prompt")
    p.add_argument("--response-length", type=int, default=512, help="L: the longest response")
    p.add_argument("--spread", type=float, nargs=2, default=[0.25, 1.0], metavar=("LO", "HI"),
                   help="response lengths from LO*L to HI*L")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def make_batch(args, vocab: int, device) -> PolicyBatch:
    g = torch.Generator().manual_seed(args.seed)
    N, P, L = args.responses, args.prompt_length, args.response_length
    lo, hi = args.spread
    fraction = [b / max(1, N - 1) for b in range(N)]
    response_lengths = [max(1, round(L * (lo + (hi - lo) * f))) for f in fraction]
    prompt_lengths = [max(1, round(P * (0.5 + 0.5 * f))) for f in fraction]
    order = torch.randperm(N, generator=g).tolist()
    ids = torch.randint(0, vocab - 2, (N, P + L), generator=g)
    response = torch.zeros(N, L, dtype=torch.bool)
    attention = torch.zeros(N, P + L, dtype=torch.long)
    for row, b in enumerate(order):
        response[row, : response_lengths[b]] = True
        attention[row, P - prompt_lengths[b] : P + response_lengths[b]] = 1
    return PolicyBatch(ids.to(device), P, response.to(device), torch.linspace(-1, 1, N, device=device),
                       torch.arange(N, device=device), attention_mask=attention.to(device), group_size=N)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = LLaDAModelLM(LLaDAConfig.preset(args.preset)).to(device)
    batch = make_batch(args, model.config.vocab_size, device)
    real_tokens = int(batch.attention_mask.sum())

    def update(pack: bool):
        model.zero_grad(set_to_none=True)
        accumulate_policy_gradient(model, batch, objective=args.objective, num_samples=args.nt, seed=args.seed,
                                   micro_batch_size=args.micro_batch, pack_sequences=pack)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows, grads = [], {}
    for pack in (False, True):
        update(pack)  # warm-up
        grads[pack] = [p.grad.clone() for p in model.parameters()]
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            update(pack)
            seconds.append(time.perf_counter() - start)
        with track_peak_memory(device) as mem:
            update(pack)
        median = statistics.median(seconds)
        rows.append({"packed": pack, "seconds": median, "tokens_per_s": real_tokens / median,
                     "peak_mib": mem.peak_mib})
    difference = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                     for a, b in zip(grads[True], grads[False]))
    padded, packed = rows
    summary = {"speedup": packed["tokens_per_s"] / padded["tokens_per_s"],
               "peak_ratio": packed["peak_mib"] / padded["peak_mib"], "max_relative_grad_difference": difference,
               "real_tokens": real_tokens, "padded_tokens": batch.input_ids.numel()}
    print(f"{'':8} {'s/update':>9} {'tokens/s':>9} {'peak MiB':>9}")
    for row in rows:
        print(f"{'packed' if row['packed'] else 'padded':8} {row['seconds']:9.3f} {row['tokens_per_s']:9.0f} "
              f"{row['peak_mib']:9.1f}")
    print(f"speedup {summary['speedup']:.2f}x, peak ratio {summary['peak_ratio']:.2f}, "
          f"max relative gradient difference {difference:.1e} ({real_tokens} real of {summary['padded_tokens']} tokens)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"packing_{device.type}_{args.preset}.json").write_text(
        json.dumps({"config": vars(args), "rows": rows, "summary": summary}, indent=2))
    return rows


if __name__ == "__main__":
    main()
