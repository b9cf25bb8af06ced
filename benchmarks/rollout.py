"""Rollout speed and quality of the accelerated samplers (Fast-dLLM KV cache, threshold decoding).

Part 1, throughput: one ``bgpo.rollout.generate`` call per sampler on a random-weight LLaDA (default
the ``small`` preset, prompt 256, answer 256, block 32, 256 steps: LLaDA's one token per step), greedy.
Random weights predict almost uniformly (top probability ~ 1/vocabulary), so no position would ever
pass a confidence threshold; ``--head-scale`` multiplies the LM head so that the confidences spread
over (0, 1) as a trained model's do.  It changes no cost, only how many forwards the threshold saves
(printed next to each throughput: forwards per answer).

With ``--hf`` part 1 drives a transformers Llama of the same shape (made bidirectional) through
``HFMaskedDiffusionAdapter`` instead, whose only cache is ``"prefix"`` (the model's own cache, cut back to
the prefix; see ``bgpo.models.adapter_cache``): ``--hf --samplers exact prefix "prefix + threshold"``.

Part 2, quality: the tiny-sudoku preset's supervised warm-up (the CPU demo's, ``sft.steps`` 200), then
its held-out reward, greedy, with low-confidence remasking (the threshold compares those
confidences), for every sampler.

    nice python benchmarks/rollout.py            # both parts, a few minutes on a CPU
    nice python benchmarks/rollout.py --hf --samplers exact prefix "prefix + threshold" --sudoku-warmup-steps 0

Writes a table to stdout and JSON (``--out``, default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bgpo.models import LLaDAConfig, LLaDAModelLM
from bgpo.rollout import generate

SAMPLERS = {"exact": dict(), "dual": dict(cache="dual"), "prefix": dict(cache="prefix")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--samplers", nargs="+", default=["exact", "dual", "dual + threshold"],
                   help="part 1's samplers (the first is the baseline); part 2 runs all of them")
    p.add_argument("--head-scale", type=float, default=30.0)
    p.add_argument("--hf", action="store_true",
                   help="part 1 on a transformers Llama of the preset's shape through HFMaskedDiffusionAdapter")
    p.add_argument("--sudoku-warmup-steps", type=int, default=200, help="0 skips part 2")
    p.add_argument("--sudoku-eval-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine two threads wait for each other, 7x slower)")
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def _samplers(threshold: float) -> dict:
    return {**SAMPLERS, "dual + threshold": dict(cache="dual", threshold=threshold),
            "prefix + threshold": dict(cache="prefix", threshold=threshold), "threshold": dict(threshold=threshold)}


def _hf_model(config: LLaDAConfig):
    """A transformers Llama of ``config``'s shape, bidirectional (no causal mask), in the adapter."""
    import transformers

    from bgpo.models import HFMaskedDiffusionAdapter

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=config.padded_vocab_size, hidden_size=config.d_model, intermediate_size=config.mlp_hidden_size,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.num_kv_heads, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_sequence_length, tie_word_embeddings=False))
    llama.config.is_causal = False
    for module in llama.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return HFMaskedDiffusionAdapter(llama, mask_token_id=config.mask_token_id, eos_token_id=config.eos_token_id)


@torch.no_grad()
def throughput(args) -> list[dict]:
    torch.manual_seed(args.seed)
    config = LLaDAConfig.preset(args.preset)
    model = (_hf_model(config) if args.hf else LLaDAModelLM(config)).eval()
    model.lm_head_weight.mul_(args.head_scale)
    prompt = torch.randint(0, config.vocab_size - 2, (args.batch, args.prompt_length))
    kwargs = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
    generate(model, prompt[:, :8], gen_length=args.block_length, block_length=args.block_length, steps=2)  # warm-up
    rows, samplers = [], _samplers(args.threshold)
    for name in args.samplers:
        cpu = time.process_time()
        out = generate(model, prompt, **kwargs, **samplers[name])
        cpu = time.process_time() - cpu
        if not rows:  # the first sampler is the baseline
            base = (out, cpu)
        same = (out.sequences == base[0].sequences)[:, args.prompt_length:].float().mean().item()
        # The CPU time of this process is less sensitive than the wall time to other jobs on the machine.
        rows.append({"sampler": name, "tokens_per_s": out.tokens_per_second, "forwards_per_answer": out.forwards,
                     "parallel_fraction": out.parallel_fraction, "tokens_equal_to_baseline": same,
                     "speedup": out.tokens_per_second / base[0].tokens_per_second, "cpu_s": cpu,
                     "cpu_speedup": base[1] / cpu})
        print(f"{name:>17}: {out.tokens_per_second:8.1f} tokens/s  {out.forwards:4d} forwards/answer  "
              f"x{rows[-1]['speedup']:.2f} (CPU time x{rows[-1]['cpu_speedup']:.2f})", file=sys.stderr)
    return rows


def sudoku(args) -> list[dict]:
    from bgpo.train import Trainer, load_config

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(preset="tiny-sudoku", overrides=[
            f"output_dir={tmp}", f"sft.steps={args.sudoku_warmup_steps}", f"data.eval_size={args.sudoku_eval_size}",
            "rollout.remasking=low_confidence", "log.eval_temperature=0", "log.eval_samples=1", "log.progress=false",
            "log.tensorboard=false", f"seed={args.seed}",
        ])
        trainer = Trainer(config)
        trainer.warm_up()
        rows = []
        for name, options in _samplers(args.threshold).items():
            config.rollout.cache, config.rollout.threshold = options.get("cache"), options.get("threshold")
            result = trainer.evaluate()
            rows.append({"sampler": name, "reward": result["reward"], "accuracy": result["accuracy"]})
            print(f"{name:>17}: held-out reward {result['reward']:.4f}", file=sys.stderr)
        config.rollout.cache, config.rollout.threshold = None, None
    return rows


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        speed = throughput(args)
        quality = sudoku(args) if args.sudoku_warmup_steps > 0 else []
    finally:
        torch.set_num_threads(threads)
    report(args, speed, quality)
    return speed, quality


def report(args, speed: list[dict], quality: list[dict]) -> None:
    print(f"\n{args.preset} preset{' (transformers Llama, HFMaskedDiffusionAdapter)' if args.hf else ''}, batch {args.batch}, prompt {args.prompt_length}, answer {args.gen_length}, "
          f"block {args.block_length}, {args.steps} steps, greedy, LM head x{args.head_scale}")
    print(f"{'sampler':>17} {'tokens/s':>9} {'speedup':>8} {'CPU s':>7} {'CPU speedup':>12} {'fwd/answer':>11} "
          f"{'parallel':>9} {'=baseline':>10}")
    for r in speed:
        print(f"{r['sampler']:>17} {r['tokens_per_s']:>9.1f} {r['speedup']:>8.2f} {r['cpu_s']:>7.1f} "
              f"{r['cpu_speedup']:>12.2f} {r['forwards_per_answer']:>11d} {r['parallel_fraction']:>9.2f} "
              f"{r['tokens_equal_to_baseline']:>10.2f}")
    if quality:
        print(f"\ntiny-sudoku after {args.sudoku_warmup_steps} warm-up steps: held-out reward "
              f"({args.sudoku_eval_size} puzzles, greedy, low-confidence remasking)")
        for r in quality:
            print(f"{r['sampler']:>17} {r['reward']:.4f}  (difference to exact {r['reward'] - quality[0]['reward']:+.4f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rollout_cpu_{args.preset}{'_hf' if args.hf else ''}.json"
    path.write_text(json.dumps({"config": vars(args), "throughput": speed, "sudoku": quality}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
