"""Plot training curves from ``metrics.jsonl`` files: held-out reward (evaluations) and training reward.

``python -m bgpo.train.plot OUT.png bgpo=runs/a/metrics.jsonl vrpo=runs/b/metrics.jsonl``
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["read_metrics", "plot_runs"]


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(runs: dict[str, str | Path], out: str | Path, *, smooth: int = 5) -> None:
    """Two panels: held-out reward at each evaluation, and the training reward (moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (held_out, train) = plt.subplots(1, 2, figsize=(10, 3.6))
    decoding = "greedy"
    for index, (label, path) in enumerate(runs.items()):
        style = ("-", "--", ":", "-.")[index % 4]  # curves that coincide (bgpo and vrpo on-policy) stay visible
        records = read_metrics(path)
        evals = [r for r in records if r["kind"] == "eval"]
        held_out.plot([r["step"] for r in evals], [r["reward"] for r in evals], marker="o", linestyle=style,
                      label=label)
        if evals and evals[0].get("temperature", 0.0) > 0:
            decoding = f"{evals[0]['samples_per_prompt']} samples/prompt at T={evals[0]['temperature']:g}"
        steps = [r["step"] for r in records if r["kind"] == "train"]
        rewards = [r["reward"] for r in records if r["kind"] == "train"]
        averaged = [sum(rewards[max(0, i - smooth + 1): i + 1]) / len(rewards[max(0, i - smooth + 1): i + 1])
                    for i in range(len(rewards))]
        train.plot(steps, averaged, linestyle=style, label=label)
    held_out.set(title=f"held-out reward ({decoding}; step 0 = warm-up)", xlabel="RL step", ylabel="reward")
    train.set(title=f"training reward (rollouts, moving average of {smooth})", xlabel="RL step")
    for axis in (held_out, train):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print("usage: python -m bgpo.train.plot OUT.png LABEL=metrics.jsonl [LABEL=metrics.jsonl ...]", file=sys.stderr)
        return 2
    plot_runs(dict(a.split("=", 1) for a in argv[1:]), argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
