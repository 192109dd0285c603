"""Compare finished pre-training runs: loss curves in one plot, and a table with tokens/s.

Why: the benchmark that matters for SOAP is loss against AdamW at the same token budget and the
throughput it costs. Each run writes ``metrics.jsonl``; this reads several, so SOAP and AdamW runs
of the same config (``--optimizer soap|adamw``) become one figure and one table in docs/.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soap_dist.pretrain.metrics import METRICS_FILE, read_records


@dataclass
class RunSummary:
    name: str
    steps: int
    tokens: int
    final_train: float
    final_eval: float | None
    tokens_per_s: float  # median over the run's records (start-up excluded by construction)
    train: list[tuple[int, float]]
    evals: list[tuple[int, float]]


def summarize(run_dir: str | Path, name: str | None = None) -> RunSummary:
    """Read one run directory's metrics.jsonl; a missing or empty file is an error naming the path."""
    path = Path(run_dir) / METRICS_FILE
    records = read_records(path)
    train = [r for r in records if "loss" in r]
    if not train:
        raise FileNotFoundError(
            f"{path}: no training records; is {run_dir} a finished pretrain run directory?"
        )
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in records if "eval_loss" in r]
    # a resumed run can log the final eval twice; keep the last record per step
    evals = sorted(dict(evals).items())
    return RunSummary(
        name=name or Path(run_dir).name,
        steps=int(train[-1]["step"]),
        tokens=int(train[-1]["tokens"]),
        final_train=float(train[-1]["loss"]),
        final_eval=evals[-1][1] if evals else None,
        tokens_per_s=statistics.median(float(r["tokens_per_s"]) for r in train),
        train=[(int(r["step"]), float(r["loss"])) for r in train],
        evals=evals,
    )


def table(runs: list[RunSummary]) -> str:
    """A markdown table; ratios are against the first run."""
    base = runs[0]
    lines = [
        "| run | steps | tokens | final train loss | final held-out loss | tokens/s (median) | tokens/s vs "
        f"{base.name} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        held = f"{r.final_eval:.4f}" if r.final_eval is not None else "-"
        lines.append(
            f"| {r.name} | {r.steps} | {r.tokens:,} | {r.final_train:.4f} | {held} | {r.tokens_per_s:,.0f} | "
            f"{r.tokens_per_s / base.tokens_per_s:.2f}x |"
        )
    return "\n".join(lines)


def plot(runs: list[RunSummary], out: str | Path, title: str = "") -> Path:
    """Training (lines) and held-out (markers) loss of every run against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in runs:
        per_step = r.tokens / r.steps
        xs, ys = [s * per_step for s, _ in r.train], [v for _, v in r.train]
        (line,) = ax.plot(xs, ys, label=f"{r.name} train")
        if r.evals:
            ax.plot(
                [s * per_step for s, _ in r.evals],
                [v for _, v in r.evals],
                "o--",
                color=line.get_color(),
                markersize=4,
                label=f"{r.name} held-out",
            )
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def compare(run_dirs: list[str], out: str, names: list[str] | None = None, title: str = "") -> dict[str, Any]:
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"--names has {len(names)} entries for {len(run_dirs)} run directories")
    runs = [summarize(d, n) for d, n in zip(run_dirs, names or [None] * len(run_dirs), strict=True)]
    return {"table": table(runs), "plot": str(plot(runs, out, title)), "runs": runs}
