"""Benchmark of ``bgpo.fused_elbo_loss``: every available backend, forward and forward + backward.

On a GPU (default shapes: LLaDA's LM head, V = 126464, H = 4096, 8 responses of 512 tokens, half of
them masked): time with ``triton.testing.do_bench`` (median and 20/80 % quantiles) and the peak extra
memory with ``torch.cuda.max_memory_allocated``; the baselines are the naive full-logits reference and
``torch.nn.functional.linear_cross_entropy`` (chunked) on the same masked rows (the same FLOPs without
the per-sequence weights).  Throughput counts 2·N·H·V FLOPs forward and 6·N·H·V backward, N = masked rows.

On a CPU the Triton path needs a GPU (Triton's interpreter is for tests, not timing): the script says
so and times the other backends with ``time.perf_counter`` at smaller default shapes.

    python benchmarks/fused_elbo_loss.py                       # defaults for the device found
    python benchmarks/fused_elbo_loss.py --batch 8 --length 256 --dtype bf16 --backends triton torch
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]

import bgpo  # noqa: E402
from bgpo.backends import registered_backends, resolve_backend  # noqa: E402
from bgpo.reference import fused_elbo_loss_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_DEFAULTS = dict(batch=8, length=512, hidden=4096, vocab=126464)
CPU_DEFAULTS = dict(batch=2, length=64, hidden=1024, vocab=32768)


def _inputs(args, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    B, L, H, V = args.batch, args.length, args.hidden, args.vocab
    hidden = torch.randn(B, L, H, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * H**-0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (B, L), generator=gen).to(device)
    masked = (torch.rand(B, L, generator=gen) < args.mask_rate).to(device)
    elbo_weight = (1.0 / torch.full((B,), args.mask_rate)).to(device)
    advantages = torch.randn(B, generator=gen).to(device)
    return hidden, weight, targets, masked, elbo_weight, advantages


def _cases(args, inputs, backends):
    """name -> (forward fn, forward + backward fn)."""
    hidden, weight, targets, masked, elbo_weight, advantages = inputs
    cases = {}
    for name in backends:
        def fwd(name=name):
            with torch.no_grad():
                return bgpo.fused_elbo(hidden, weight, targets, masked, elbo_weight, backend=name)

        def fwd_bwd(name=name):
            bgpo.fused_elbo_loss(hidden, weight, targets, masked, elbo_weight, advantages,
                                 num_samples=16, backend=name).loss.backward()

        cases[name] = (fwd, fwd_bwd)
    if args.baselines:
        def ref_fwd():
            with torch.no_grad():
                return fused_elbo_loss_reference(hidden, weight, targets, masked, elbo_weight, advantages)

        def ref_fwd_bwd():
            fused_elbo_loss_reference(hidden, weight, targets, masked, elbo_weight, advantages,
                                      num_samples=16).loss.backward()

        cases["reference (full logits)"] = (ref_fwd, ref_fwd_bwd)
        lce = getattr(torch.nn.functional, "linear_cross_entropy", None)
        options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if lce is not None and options is not None:
            rows = masked.reshape(-1).nonzero().squeeze(1)

            def lce_call():
                h = hidden.reshape(-1, hidden.shape[-1])[rows]
                return lce(h, weight, targets.reshape(-1)[rows], reduction="sum", options=options())

            def lce_fwd():
                with torch.no_grad():
                    return lce_call()

            def lce_fwd_bwd():
                lce_call().backward()

            cases["torch linear_cross_entropy (chunked)"] = (lce_fwd, lce_fwd_bwd)
    return cases


def _flops(args, masked_rows):
    nhv = masked_rows * args.hidden * args.vocab
    return 2 * nhv, 8 * nhv  # forward; forward + backward (2 + 6)


def _gpu_measure(fn, grads):
    import triton.testing

    median, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)
    torch.cuda.synchronize()
    for g in grads:
        g.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return median, q20, q80, peak


def _cpu_measure(fn, grads, repeat):
    times = []
    fn()  # warm-up
    for _ in range(repeat):
        for g in grads:
            g.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[1], q[7], None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, help="responses B (GPU 8, CPU 2)")
    parser.add_argument("--length", type=int, help="response length L (GPU 512, CPU 64)")
    parser.add_argument("--hidden", type=int, help="H (GPU 4096, CPU 1024)")
    parser.add_argument("--vocab", type=int, help="V (GPU 126464, CPU 32768)")
    parser.add_argument("--mask-rate", type=float, default=0.5, help="fraction of positions masked (default 0.5)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="GPU bf16, CPU fp32")
    parser.add_argument("--backends", nargs="*", default=None, help="default: every available backend")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="skip the full-logits reference and torch's linear_cross_entropy")
    parser.add_argument("--repeat", type=int, default=5, help="CPU timing repetitions (default 5)")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    for key, value in (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]

    available = []
    for name in registered_backends("fused_elbo_loss"):
        try:
            resolve_backend("fused_elbo_loss", name, device)
            available.append(name)
        except ValueError as err:
            if name == "triton":
                print("triton: skipped -- the Triton path needs a GPU (CUDA tensors)")
            else:
                print(f"{name}: skipped ({str(err).split(': ', 1)[-1]})")
    if "triton" not in registered_backends("fused_elbo_loss"):
        print("triton: not installed (pip install triton; it needs a GPU)")
    if not on_gpu and os.environ.get("TRITON_INTERPRET") == "1" and "triton" in available:
        print("triton: runs in the interpreter here (correctness only), not timed")
        available.remove("triton")
    backends = [b for b in (args.backends or available) if b in available]

    inputs = _inputs(args, device, dtype)
    masked_rows = int(inputs[3].sum())
    fwd_flops, total_flops = _flops(args, masked_rows)
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if on_gpu else ''}, {dtype}, "
          f"B={args.batch} L={args.length} H={args.hidden} V={args.vocab}, masked rows N={masked_rows}")
    print(f"work: forward 2·N·H·V = {fwd_flops / 1e9:.1f} GFLOP, forward + backward 8·N·H·V = "
          f"{total_flops / 1e9:.1f} GFLOP")
    header = f"{'backend':<38} {'pass':<9} {'median ms':>10} {'p20 ms':>8} {'p80 ms':>8} {'TFLOP/s':>8} {'peak MB':>9}"
    print(header)
    print("-" * len(header))
    grads = [inputs[0], inputs[1]]
    for name, (fwd, fwd_bwd) in _cases(args, inputs, backends).items():
        for label, fn, flops in (("fwd", fwd, fwd_flops), ("fwd+bwd", fwd_bwd, total_flops)):
            try:
                if on_gpu:
                    median, q20, q80, peak = _gpu_measure(fn, grads)
                else:
                    median, q20, q80, peak = _cpu_measure(fn, grads, args.repeat)
            except torch.cuda.OutOfMemoryError:
                print(f"{name:<38} {label:<9} {'out of memory':>10}")
                torch.cuda.empty_cache()
                continue
            tflops = flops / (median * 1e-3) / 1e12
            peak_mb = "n/a" if peak is None else f"{peak / 2**20:.0f}"
            print(f"{name:<38} {label:<9} {median:>10.2f} {q20:>8.2f} {q80:>8.2f} {tflops:>8.2f} {peak_mb:>9}")
    if not on_gpu:
        print("peak memory is measured on CUDA only (torch.cuda.max_memory_allocated)")


if __name__ == "__main__":
    main()
