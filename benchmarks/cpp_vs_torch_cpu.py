"""The C++ CPU backend of bgpo._C against the torch backend, on the CPU: decides backend="auto".

    python benchmarks/cpp_vs_torch_cpu.py [--repeats 5]
    python benchmarks/cpp_vs_torch_cpu.py --memory

Times forward + backward of ``bgpo.fused_elbo_loss`` and one ``bgpo.random_mask`` draw per backend
(median of the repeats, after one warm-up), for a few shapes, and prints a markdown table.
``--memory``: the peak memory of one fused backward per backend (the CPU allocator's events,
``bgpo.memory.track_peak_memory``) against the bf16 grad W it returns, at issue 12's shape
(V = 16384, H = 256, bf16, 32 masked rows).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import bgpo
from bgpo.memory import track_peak_memory
from bgpo.ops import _cpp
from bgpo.ops.fused_elbo_loss import _bwd_op, _fwd_op

ELBO_SHAPES = [  # (B, L, H, V, dtype): a test-sized case, a small LM head, a mid-sized one
    (2, 64, 64, 512, torch.float32),
    (4, 256, 512, 32_000, torch.float32),
    (4, 256, 512, 32_000, torch.bfloat16),
    (2, 512, 1024, 50_000, torch.float32),
]
MASK_SHAPES = [(8, 512), (64, 1024), (16, 8192)]


def _median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _elbo_step(backend, hidden, weight, targets, masked, elbo_weight, advantages):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    out = bgpo.fused_elbo_loss(h, w, targets, masked, elbo_weight, advantages, num_samples=4, backend=backend)
    out.loss.backward()


def backward_memory(B=2, L=32, H=256, V=16384):
    """Peak bytes of one backward (grad h and grad W) per backend, over the bf16 grad W's bytes."""
    hidden = torch.randn(B, L, H).bfloat16()
    weight = (torch.randn(V, H) / H**0.5).bfloat16()
    targets = torch.randint(0, V, (B, L))
    masked = torch.zeros(B, L, dtype=torch.bool)
    masked[:, ::2] = True  # 32 masked rows
    elbo_weight, grad = torch.full((B,), 2.0), torch.randn(B)
    print(f"one backward, B={B} L={L} H={H} V={V} bf16, {int(masked.sum())} masked rows; "
          f"torch {torch.__version__}\n")
    print("| backend | peak (MiB) | peak / bf16 grad W |")
    print("| --- | ---: | ---: |")
    for backend in ("torch", "cpu"):
        _, lse = _fwd_op(hidden, weight, None, targets, masked, elbo_weight, None, backend, 0)
        with track_peak_memory("cpu") as mem:
            _bwd_op(grad, hidden, weight, None, targets, masked, elbo_weight, lse, None, backend, 0, True, True, False)
        print(f"| {backend} | {mem.peak_mib:.2f} | {mem.peak_bytes / (V * H * 2):.2f}x |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="peak memory of one backward instead of times")
    args = parser.parse_args()
    if not _cpp.available():
        raise SystemExit(f"bgpo._C is not built: {_cpp.import_error()}")
    torch.manual_seed(0)
    if args.memory:
        backward_memory()
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| op | shape | torch (ms) | cpu C++ (ms) | speed-up |")
    print("| --- | --- | ---: | ---: | ---: |")
    for B, L, H, V, dtype in ELBO_SHAPES:
        hidden = torch.randn(B, L, H).to(dtype)
        weight = (torch.randn(V, H) / H**0.5).to(dtype)
        targets = torch.randint(0, V, (B, L))
        masked = torch.rand(B, L) < 0.5
        elbo_weight = torch.full((B,), 2.0)
        advantages = torch.randn(B)
        t = {b: _median_seconds(lambda b=b: _elbo_step(b, hidden, weight, targets, masked, elbo_weight, advantages),
                                args.repeats) for b in ("torch", "cpu")}
        shape = f"B={B} L={L} H={H} V={V} {str(dtype).removeprefix('torch.')}, fwd+bwd"
        print(f"| fused_elbo_loss | {shape} | {t['torch'] * 1e3:.1f} | {t['cpu'] * 1e3:.1f} | "
              f"{t['torch'] / t['cpu']:.2f}x |")
    for B, C in MASK_SHAPES:
        ids = torch.randint(0, 1000, (B, C))
        maskable = torch.rand(B, C) < 0.8
        for scheme in ("stratified", "bernoulli"):
            t = {b: _median_seconds(lambda b=b: bgpo.random_mask(ids, maskable, mask_id=5, seed=1, sample_index=3,
                                                                 num_samples=8, scheme=scheme, backend=b),
                                    args.repeats) for b in ("torch", "cpu")}
            print(f"| random_mask | B={B} L={C} {scheme} | {t['torch'] * 1e3:.2f} | {t['cpu'] * 1e3:.2f} | "
                  f"{t['torch'] / t['cpu']:.2f}x |")


if __name__ == "__main__":
    main()
