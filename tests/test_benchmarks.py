"""The benchmarks run end to end on small settings and show what they exist to show."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_vs_nt_cpu_bgpo_is_flat_and_vrpo_grows(tmp_path):
    rows = _load("memory_vs_nt").main(["--preset", "tiny", "--nt", "1", "4", "--prompts", "1", "--group", "2",
                                       "--prompt-length", "8", "--response-length", "32", "--out", str(tmp_path)])
    peak = {(r["objective"], r["n_t"]): r["peak_step_mib"] for r in rows}
    assert peak["bgpo", 4] <= 1.05 * peak["bgpo", 1]
    assert peak["vrpo", 4] > 2 * peak["vrpo", 1]
    assert peak["diffu_grpo", 4] == peak["diffu_grpo", 1]
    saved = json.loads((tmp_path / "memory_vs_nt_cpu_tiny.json").read_text())
    assert len(saved["rows"]) == len(rows) and (tmp_path / "memory_vs_nt_cpu_tiny.png").stat().st_size > 0


def test_memory_vs_nt_simulation_finds_where_vrpo_overflows(tmp_path, capsys):
    bench = _load("memory_vs_nt")
    argv = ["--simulate", "tiny", "--nt", "1", "2", "8", "--gpus", "1", "--micro-batch", "2", "--prompt-length", "8",
            "--response-length", "32", "--out", str(tmp_path), "--no-plot"]
    rows = bench.main(argv)
    total = {(r["objective"], r["n_t"]): r["peak_total_mib"] for r in rows}
    assert total["bgpo", 8] == pytest.approx(total["bgpo", 1], rel=0.02)
    assert total["vrpo", 8] > total["vrpo", 2] > total["vrpo", 1]
    # a GPU between the two at n_t = 8: BGPO fits, VRPO-OL does not
    limit_gib = (total["bgpo", 8] + total["vrpo", 8]) / 2 / 1024
    capsys.readouterr()
    bench.main(argv + ["--gpu-memory-gib", str(limit_gib)])
    out = capsys.readouterr().out
    assert "vrpo: exceeds" in out and "from n_t = 8" in out and "bgpo: fits" in out


def test_memory_vs_nt_simulation_of_lora(tmp_path):
    """LoRA on one GPU: the frozen weights stay resident, only the adapters carry optimizer state."""
    bench = _load("memory_vs_nt")
    common = ["--simulate", "tiny", "--nt", "1", "4", "--objectives", "bgpo", "--gpus", "1", "--prompt-length", "8",
              "--response-length", "32", "--out", str(tmp_path), "--no-plot"]
    lora = {r["n_t"]: r for r in bench.main(common + ["--finetune", "lora", "--lora-rank", "4"])}
    full = {r["n_t"]: r for r in bench.main(common)}
    assert lora[4]["peak_total_mib"] == pytest.approx(lora[1]["peak_total_mib"], rel=0.02)
    assert lora[1]["static_mib"] < full[1]["static_mib"]  # 2 bytes per frozen weight, not 16


def test_grad_variance_falls_with_n_t(tmp_path):
    rows = _load("grad_variance").main(["--nt", "1", "16", "--reference-nt", "32", "--repeats", "3",
                                        "--schemes", "stratified", "--responses", "2", "--response-length", "8",
                                        "--out", str(tmp_path), "--no-plot"])
    std = {r["n_t"]: r["std"] for r in rows}
    assert std[16] < 0.5 * std[1]


def test_fused_elbo_loss_benchmark_runs(tmp_path):
    rows = _load("fused_elbo_loss").main(["--batch", "2", "--length", "16", "--hidden", "32", "--vocab", "1000",
                                          "--repeat", "1", "--backends", "torch", "--out", str(tmp_path)])
    methods = {r["method"] for r in rows}
    assert "bgpo (torch)" in methods and "full logits + F.cross_entropy" in methods
    assert json.loads((tmp_path / "fused_elbo_loss_cpu.json").read_text())["rows"]


def test_fused_elbo_loss_benchmark_peaked(tmp_path):
    """--peaked: the target's row of W in each hidden state makes its logit stand out; rows carry TFLOP/s
    (8·N·H·V forward + backward) and the first call's time; no share of a GPU peak is claimed on the CPU."""
    bench = _load("fused_elbo_loss")
    argv = ["--batch", "2", "--length", "16", "--hidden", "32", "--vocab", "1000", "--repeat", "1", "--backends",
            "torch", "--no-peers", "--out", str(tmp_path)]
    args = bench.parse_args(argv + ["--peaked"])
    hidden, weight, targets, masked, _, _ = bench.make_inputs(args)
    logits = hidden.detach() @ weight.detach().t()
    assert (logits.argmax(-1) == targets).float().mean() > 0.9  # peaked on the target
    rows = bench.main(argv + ["--peaked"])
    both = {r["pass"]: r for r in rows}
    N = int(masked.sum())
    full = both["fwd+bwd"]
    assert full["masked_rows"] == N and full["share_of_bf16_peak"] is None and full["first_call_ms"] > 0
    assert full["tflops"] == pytest.approx(8 * N * 32 * 1000 / (full["median_ms"] * 1e-3) / 1e12)
    saved = json.loads((tmp_path / "fused_elbo_loss_cpu_peaked.json").read_text())
    assert saved["config"]["peaked"] and saved["config"]["bf16_peak_tflops"] is None
    # no CCE row and no peak on the CPU: every target is written down and none is judged met
    assert [t["method"] for t in saved["targets"]] == ["bgpo (torch)"]
    assert all(saved["targets"][0][k] is None for k in ("time_met", "memory_met", "peak_met"))


def test_issue_targets_judge_each_backend_against_cce_default():
    """Issue 12's GPU targets from a benchmark's rows: time and extra memory against CCE's default call at
    the same batch, share of the bf16 peak >= 50 %; what cannot be judged is None, never met."""
    bench = _load("fused_elbo_loss")

    def row(method, batch, ms, extra, share, pass_="fwd+bwd"):
        return {"method": method, "pass": pass_, "batch": batch, "masked_rows": 256 * batch, "median_ms": ms,
                "extra_mib": extra, "share_of_bf16_peak": share}

    rows = [row("bgpo (triton)", 8, 9.0, 100.0, 0.62), row("bgpo (cuda)", 8, 12.0, 90.0, 0.46),
            row(bench.CCE_DEFAULT, 8, 10.0, 95.0, 0.55), row("bgpo (triton)", 8, 1.0, 1.0, 0.9, pass_="fwd"),
            row("bgpo (triton)", 64, 70.0, 700.0, None),
            {"method": "bgpo (torch)", "pass": "fwd+bwd", "batch": 64, "masked_rows": 16384, "error": "OOM"}]
    targets = {(t["method"], t["batch"]): t for t in bench.issue_targets(rows)}
    assert set(targets) == {("bgpo (triton)", 8), ("bgpo (cuda)", 8), ("bgpo (triton)", 64)}
    triton, cuda, large = targets["bgpo (triton)", 8], targets["bgpo (cuda)", 8], targets["bgpo (triton)", 64]
    assert triton["time_vs_cce_default"] == pytest.approx(0.9) and triton["extra_mib_minus_cce_default"] == 5.0
    assert (triton["time_met"], triton["memory_met"], triton["peak_met"]) == (True, False, True)
    assert (cuda["time_met"], cuda["memory_met"], cuda["peak_met"]) == (False, True, False)
    assert large["time_vs_cce_default"] is None and large["time_met"] is None and large["peak_met"] is None


def test_rollout_benchmark_cache_and_threshold_save_forwards(tmp_path):
    speed, quality = _load("rollout").main([
        "--preset", "tiny", "--prompt-length", "16", "--gen-length", "16", "--block-length", "8", "--steps", "16",
        "--samplers", "exact", "dual", "dual + threshold", "--sudoku-warmup-steps", "2", "--sudoku-eval-size", "8",
        "--out", str(tmp_path)])
    rows = {r["sampler"]: r for r in speed}
    assert rows["exact"]["forwards_per_answer"] == rows["dual"]["forwards_per_answer"] == 16
    assert rows["dual + threshold"]["forwards_per_answer"] < 16 and rows["dual + threshold"]["parallel_fraction"] > 0
    assert [r["sampler"] for r in quality] == ["exact", "dual", "prefix", "dual + threshold", "prefix + threshold",
                                               "threshold"]
    assert all(0 <= r["reward"] <= 1 for r in quality)
    assert json.loads((tmp_path / "rollout_cpu_tiny.json").read_text())["throughput"]


def test_rollout_benchmark_hugging_face_prefix_cache(tmp_path):
    pytest.importorskip("transformers")
    speed, quality = _load("rollout").main([
        "--hf", "--preset", "tiny", "--prompt-length", "16", "--gen-length", "16", "--block-length", "8",
        "--steps", "16", "--samplers", "exact", "prefix", "prefix + threshold", "--threshold", "0.1",
        "--sudoku-warmup-steps", "0",
        "--out", str(tmp_path)])
    rows = {r["sampler"]: r for r in speed}
    assert rows["exact"]["forwards_per_answer"] == rows["prefix"]["forwards_per_answer"] == 16 and not quality
    assert rows["prefix + threshold"]["forwards_per_answer"] < 16
    assert json.loads((tmp_path / "rollout_cpu_tiny_hf.json").read_text())["config"]["hf"]
