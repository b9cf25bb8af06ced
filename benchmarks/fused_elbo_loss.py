"""Benchmark of ``bgpo.fused_elbo_loss`` against its peers: time, rows/s and peak extra memory.

Every backend of the op, and on the same masked rows (half of the positions by default):

* full logits + ``F.cross_entropy`` (the naive path);
* ``torch.nn.functional.linear_cross_entropy`` with chunking (torch >= 2.14);
* Cut Cross-Entropy (``pip install cut-cross-entropy``): its ``torch_compile`` implementation on the
  CPU, its Triton one on a GPU;
* Liger-Kernel's fused linear cross-entropy (``pip install liger-kernel``), on a GPU;

each where installed.  The peers compute Σ log p over the rows (the same 2·N·H·V forward FLOPs); the op
adds the per-sequence weights and the BGPO bound.  Forward and forward + backward are timed (GPU:
``triton.testing.do_bench``, median and 20/80 % quantiles; CPU: ``time.perf_counter`` over
``--repeat`` runs); the peak memory above the inputs is measured on its own run (GPU:
``torch.cuda.max_memory_allocated``; CPU: the allocator's events, ``bgpo.memory.track_peak_memory``),
and reported also as *extra* memory: the peak less the gradients of hidden and weight, which every
method returns.
The Triton backend needs a GPU (its interpreter is for tests, not timing).

``--peaked``: realistic, peaked logits instead of random ones (a near-uniform softmax flatters methods
that skip vocabulary blocks of negligible mass): each masked row's hidden state is its target's row of
W scaled by s ~ U(5, 25) plus unit noise, so the target's logit is about s and the others about
N(0, 1 + s²/H): at V = 126464 the target's probability ranges from ~1e-3 (s = 5) to ~1 (s >= 15).
On a GPU it runs LLaDA's head (H = 4096, V = 126464, L = 512, half masked) at B = 8 and B = 64
(N ≈ 2k and ≈ 16k masked rows).  Every row adds TFLOP/s counted as 8·N·H·V for forward + backward
(2 forward, 6 backward: recompute, grad h, grad W), the share of the device's dense bf16 peak
(BF16_PEAK_TFLOPS: the vendor's spec; SPEC.md measured about 790 TFLOP/s for plain bf16 matrix
products on the H200, 80% of its 989), and the first call's time (compilation and autotuning
included).  Cut Cross-Entropy runs its default and exact variants.

    python benchmarks/fused_elbo_loss.py          # CPU: V = 126464, H scaled down to 256
    python benchmarks/fused_elbo_loss.py --batch 8 --length 512 --hidden 4096 --dtype bf16  # GPU: LLaDA's head
    python benchmarks/fused_elbo_loss.py --peaked  # GPU: N ≈ 2k and 16k; CPU: the CPU shape, peaked
    TRITON_INTERPRET=1 python benchmarks/fused_elbo_loss.py --backward-peak  # backward_peak()

Writes a table to stdout and JSON (``--out``, default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bgpo
from bgpo.backends import available_backends, registered_backends
from bgpo.memory import track_peak_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_DEFAULTS = dict(batch=8, length=512, hidden=4096, vocab=126464, dtype="bf16")
CPU_DEFAULTS = dict(batch=4, length=128, hidden=256, vocab=126464, dtype="fp32")
PEAKED_GPU_BATCHES = (8, 64)  # N ≈ 2048 and ≈ 16384 masked rows at L = 512, half masked
# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, the vendors' specs, by a substring of the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
CCE_DEFAULT = "Cut Cross-Entropy (default)"
# Issue 12's GPU targets, forward + backward at N ≈ 2048: at most CCE's default time, no more extra memory
# than it, at least half of the device's dense bf16 peak.
TARGET_SHARE_OF_PEAK = 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, help="responses B (GPU 8, CPU 4)")
    p.add_argument("--length", type=int, help="response length L (GPU 512, CPU 128)")
    p.add_argument("--hidden", type=int, help="H (GPU 4096, CPU 256)")
    p.add_argument("--vocab", type=int, help="V (126464, LLaDA's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="GPU bf16, CPU fp32")
    p.add_argument("--mask-rate", type=float, default=0.5, help="fraction of positions masked (default 0.5)")
    p.add_argument("--backends", nargs="*", default=None, help="bgpo backends (default: every one available)")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="time bgpo's backends only")
    p.add_argument("--repeat", type=int, default=5, help="CPU timing repetitions (default 5)")
    p.add_argument("--peaked", action="store_true", help="peaked logits; on a GPU at N ≈ 2k and 16k (see above)")
    p.add_argument("--backward-peak", action="store_true",
                   help="only the peak memory of one backward per backend against its grad W (backward_peak())")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON")
    args = p.parse_args(argv)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batches = [args.batch] if args.batch or not (args.peaked and args.device.type == "cuda") \
        else list(PEAKED_GPU_BATCHES)
    for key, value in (GPU_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def make_inputs(args):
    gen = torch.Generator().manual_seed(0)
    B, L, H, V = args.batch, args.length, args.hidden, args.vocab
    dtype, device = DTYPES[args.dtype], args.device
    weight = torch.randn(V, H, generator=gen) * H**-0.5  # rows of norm ≈ 1
    targets = torch.randint(0, V, (B, L), generator=gen)
    hidden = torch.randn(B, L, H, generator=gen)
    if args.peaked:  # h = s W[y] + noise: z_y ≈ s, z_v ≈ N(0, 1 + s²/H) for v != y
        scale = torch.rand(B, L, 1, generator=gen) * 20 + 5
        hidden += scale * weight[targets]
    hidden = hidden.to(device, dtype).requires_grad_()
    weight = weight.to(device, dtype).requires_grad_()
    targets = targets.to(device)
    masked = (torch.rand(B, L, generator=gen) < args.mask_rate).to(device)
    elbo_weight = torch.full((B,), 1.0 / args.mask_rate, device=device)
    advantages = torch.randn(B, generator=gen).to(device)
    return hidden, weight, targets, masked, elbo_weight, advantages


def bgpo_case(backend, inputs):
    hidden, weight, targets, masked, elbo_weight, advantages = inputs

    def loss():
        return bgpo.fused_elbo_loss(hidden, weight, targets, masked, elbo_weight, advantages, num_samples=16,
                                    backend=backend).loss
    return loss


def peer_cases(args, inputs):
    """name -> fn returning a scalar loss over the masked rows (the rows gathered inside, as a caller would)."""
    hidden, weight, targets, masked, _, _ = inputs
    rows = masked.reshape(-1).nonzero().squeeze(1)
    H = hidden.shape[-1]

    def gathered():
        return hidden.reshape(-1, H)[rows], targets.reshape(-1)[rows]

    def full_logits():
        h, y = gathered()
        return F.cross_entropy(F.linear(h, weight).float(), y, reduction="sum")

    cases = {"full logits + F.cross_entropy": full_logits}
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is not None:
        def torch_lce():
            h, y = gathered()
            return F.linear_cross_entropy(h, weight, y, reduction="sum", options=options())
        cases["torch linear_cross_entropy"] = torch_lce
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        print("Cut Cross-Entropy: not installed (pip install cut-cross-entropy)")
    else:
        # On a GPU its default call (Triton, gradient filtering) and its exact variant (filter_eps=None: the
        # PyPI release 25.1.1 has no impl="cce_exact"); on the CPU its torch.compile path.
        variants = ({CCE_DEFAULT: {}, "Cut Cross-Entropy (exact: filter_eps=None)": {"filter_eps": None}}
                    if args.device.type == "cuda" else {"Cut Cross-Entropy (torch_compile)": {"impl": "torch_compile"}})
        for name, options in variants.items():
            def cut_ce(options=options):
                h, y = gathered()
                return cce(h, weight, y, reduction="sum", **options)
            cases[name] = cut_ce
    if args.device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            print("Liger-Kernel: not installed (pip install liger-kernel)")
        else:
            liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")

            def liger_flce():
                h, y = gathered()
                return liger(weight, h, y)
            cases["Liger fused linear CE"] = liger_flce
    else:
        print("Liger-Kernel: its fused linear cross-entropy is Triton-only, skipped on the CPU")
    return cases


def timed(fn, args, grads):
    """(median, p20, p80) ms of fn()."""
    if args.device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads))
    fn()  # warm-up (and compilation, for torch.compile'd peers)
    times = []
    for _ in range(args.repeat):
        for g in grads:
            g.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def peak_bytes(fn, args, grads):
    for g in grads:
        g.grad = None
    with track_peak_memory(args.device) as mem:
        fn()
    return mem.peak_bytes


def device_peak_tflops(device):
    """(dense bf16 peak TFLOP/s from BF16_PEAK_TFLOPS, device name), or (None, name) if not in the table."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None), name


def measure(name, label, fn, args, grads, N, grad_bytes, peak_tflops):
    """One row: first call's time (compilation and tuning included), timing, memory, TFLOP/s."""
    for g in grads:
        g.grad = None
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    first_ms = (time.perf_counter() - start) * 1e3
    median, p20, p80 = timed(fn, args, grads)
    peak = peak_bytes(fn, args, grads)
    flops = (8 if label == "fwd+bwd" else 2) * N * args.hidden * args.vocab
    tflops = flops / (median * 1e-3) / 1e12
    return {"method": name, "pass": label, "batch": args.batch, "masked_rows": N, "median_ms": median,
            "p20_ms": p20, "p80_ms": p80, "first_call_ms": first_ms, "rows_per_s": N / (median * 1e-3),
            "tflops": tflops, "share_of_bf16_peak": None if peak_tflops is None else tflops / peak_tflops,
            "peak_mib": peak / 2**20, "extra_mib": (peak - (grad_bytes if label == "fwd+bwd" else 0)) / 2**20}


def run_batch(args, peak_tflops):
    inputs = make_inputs(args)
    hidden, weight = inputs[0], inputs[1]
    grads = [hidden, weight]
    N = int(inputs[3].sum())
    nhv = N * args.hidden * args.vocab
    print(f"\ndevice {args.device}, {args.dtype}, B={args.batch} L={args.length} H={args.hidden} V={args.vocab}, "
          f"{'peaked' if args.peaked else 'random'} logits, masked rows N={N}; forward 2·N·H·V = "
          f"{2 * nhv / 1e9:.1f} GFLOP, backward 6·N·H·V")
    if "triton" in registered_backends("fused_elbo_loss") and args.device.type != "cuda":
        print("triton: skipped -- the Triton path needs a GPU (CUDA tensors)")
    usable = [b for b in available_backends("fused_elbo_loss", args.device)
              if b != "triton" or args.device.type == "cuda"]
    cases = {f"bgpo ({b})": bgpo_case(b, inputs) for b in (args.backends or usable) if b in usable}
    if args.peers:
        cases.update(peer_cases(args, inputs))

    rows = []
    grad_bytes = sum(t.numel() * t.element_size() for t in grads)
    header = (f"{'method':<36} {'pass':<8} {'median ms':>10} {'p20':>9} {'p80':>9} {'TFLOP/s':>8} {'of peak':>8} "
              f"{'first ms':>9} {'peak MiB':>9} {'extra MiB':>9}")
    print(header + "\n" + "-" * len(header))
    for name, loss in cases.items():
        for label, fn in (("fwd", lambda loss=loss: _no_grad(loss)), ("fwd+bwd", lambda loss=loss: loss().backward())):
            try:
                row = measure(name, label, fn, args, grads, N, grad_bytes, peak_tflops)
            except Exception as error:  # a peer's failure (an unknown variant, out of memory) is a row, not the end
                print(f"{name:<36} {label:<8} failed: {type(error).__name__}: {str(error)[:200]}")
                rows.append({"method": name, "pass": label, "batch": args.batch, "masked_rows": N,
                             "error": f"{type(error).__name__}: {error}"})
                continue
            rows.append(row)
            share = "-" if row["share_of_bf16_peak"] is None else f"{100 * row['share_of_bf16_peak']:.0f}%"
            print(f"{name:<36} {label:<8} {row['median_ms']:>10.1f} {row['p20_ms']:>9.1f} {row['p80_ms']:>9.1f} "
                  f"{row['tflops']:>8.1f} {share:>8} {row['first_call_ms']:>9.0f} {row['peak_mib']:>9.1f} "
                  f"{row['extra_mib']:>9.1f}")
    print_ratios([r for r in rows if "error" not in r])
    del inputs, grads, hidden, weight
    return rows


def backward_peak(args):
    """Per backend: the peak memory of one backward (bf16, V = 16384, H = 256, 32 masked rows: issue 12's
    setting) from the allocator's events, as a multiple of the bf16 grad W it returns, and the memory
    beyond the gradients against what the backend declares (``workspace_bytes``)."""
    from bgpo.backends import resolve_backend

    B, L, H, V = 1, 64, 256, 16384
    rows = []
    print(f"one backward, bf16, V={V} H={H}, 32 masked rows, on {args.device}")
    for backend in args.backends or available_backends("fused_elbo_loss", args.device):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(B, L, H, generator=g).to(args.device, torch.bfloat16).requires_grad_()
        weight = (torch.randn(V, H, generator=g) * H**-0.5).to(args.device, torch.bfloat16).requires_grad_()
        masked = (torch.arange(L) < 32).unsqueeze(0).to(args.device)
        targets = torch.randint(0, V, (B, L), generator=g).to(args.device)
        ones = torch.ones(B, device=args.device)
        try:
            out = bgpo.fused_elbo_loss(hidden, weight, targets, masked, ones, ones, backend=backend)
            with track_peak_memory(args.device) as mem:
                out.loss.backward()
        except Exception as error:  # one backend's failure is a line, not the end
            print(f"  {backend:<8} failed: {type(error).__name__}: {str(error)[:200]}")
            rows.append({"backend": backend, "error": f"{type(error).__name__}: {error}"})
            continue
        grad_w = V * H * 2
        beyond = mem.peak_bytes - grad_w - hidden.numel() * 2
        declare = getattr(resolve_backend("fused_elbo_loss", backend, args.device).impl, "workspace_bytes", None)
        declared = None if declare is None else declare("backward", hidden, weight, 0, True)
        rows.append({"backend": backend, "peak_over_grad_w": mem.peak_bytes / grad_w,
                     "beyond_grads_mib": beyond / 2**20,
                     "declared_mib": None if declared is None else declared / 2**20})
        print(f"  {backend:<8} peak {mem.peak_bytes / grad_w:.2f}x grad W; {beyond / 2**20:.2f} MiB beyond the "
              f"gradients, declared {'nothing' if declared is None else f'{declared / 2**20:.2f} MiB'}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.backward_peak:
        return backward_peak(args)
    peak_tflops, device_name = device_peak_tflops(args.device)
    if args.device.type == "cuda":
        print(f"{device_name}: dense bf16 peak {peak_tflops} TFLOP/s (vendor spec; BF16_PEAK_TFLOPS)")
    rows = []
    for batch in args.batches:
        args.batch = batch
        rows += run_batch(args, peak_tflops)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fused_elbo_loss_{args.device.type}{'_peaked' if args.peaked else ''}.json"
    config = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    targets = issue_targets(rows)
    print_targets(targets)
    path.write_text(json.dumps({"config": config | {"torch": torch.__version__, "device_name": device_name,
                                                   "bf16_peak_tflops": peak_tflops},
                                "rows": rows, "targets": targets}, indent=2))
    print(f"\nwrote {path}")
    return rows


def issue_targets(rows):
    """Issue 12's GPU targets for each bgpo backend, forward + backward, per batch: time and extra memory
    against Cut Cross-Entropy's default call on the same rows, and the share of the bf16 peak.  A target
    that cannot be judged (CCE absent, no peak known for the device, a failed row) is None, never met."""
    full = [r for r in rows if r["pass"] == "fwd+bwd" and "error" not in r]
    targets = []
    for batch in sorted({r["batch"] for r in full}):
        at = {r["method"]: r for r in full if r["batch"] == batch}
        cce = at.get(CCE_DEFAULT)
        for method, row in at.items():
            if not method.startswith("bgpo"):
                continue
            share = row["share_of_bf16_peak"]
            targets.append({
                "method": method, "batch": batch, "masked_rows": row["masked_rows"],
                "time_vs_cce_default": None if cce is None else row["median_ms"] / cce["median_ms"],
                "extra_mib_minus_cce_default": None if cce is None else row["extra_mib"] - cce["extra_mib"],
                "share_of_bf16_peak": share,
                "time_met": None if cce is None else row["median_ms"] <= cce["median_ms"],
                "memory_met": None if cce is None else row["extra_mib"] <= cce["extra_mib"],
                "peak_met": None if share is None else share >= TARGET_SHARE_OF_PEAK,
            })
    return targets


def print_targets(targets):
    if not targets:
        return
    print(f"\nissue 12's targets, forward + backward (time and extra memory <= {CCE_DEFAULT}; "
          f">= {TARGET_SHARE_OF_PEAK:.0%} of the bf16 peak); '-': not judged")
    mark = {True: "met", False: "MISSED", None: "-"}
    for t in targets:
        ratio = "-" if t["time_vs_cce_default"] is None else f"{t['time_vs_cce_default']:.2f}x"
        share = "-" if t["share_of_bf16_peak"] is None else f"{t['share_of_bf16_peak']:.0%}"
        print(f"  {t['method']:<14} N={t['masked_rows']:<6} time {ratio:>6} of CCE ({mark[t['time_met']]}), "
              f"extra memory ({mark[t['memory_met']]}), {share} of peak ({mark[t['peak_met']]})")


def _no_grad(loss):
    with torch.no_grad():
        return loss()


def print_ratios(rows):
    """Time and memory of each bgpo backend relative to each peer, forward + backward."""
    full = {r["method"]: r for r in rows if r["pass"] == "fwd+bwd"}
    ours = [m for m in full if m.startswith("bgpo")]
    peers = [m for m in full if not m.startswith("bgpo")]
    if not ours or not peers:
        return
    print("\nforward + backward, bgpo relative to each peer (< 1 is better)")
    for o in ours:
        for p in peers:
            print(f"  {o:<14} vs {p:<36} time {full[o]['median_ms'] / full[p]['median_ms']:6.2f}x   "
                  f"extra memory {full[o]['extra_mib'] / max(full[p]['extra_mib'], 1e-9):7.3f}x")


if __name__ == "__main__":
    main()
