"""Compare finished pre-training runs: loss curves in one plot, and a table with tokens/s.

Why: the benchmark that matters for SOAP is loss against AdamW at the same token budget and the
throughput it costs. Each run writes ``metrics.jsonl``; this reads several, so SOAP and AdamW runs
of the same config (``--optimizer soap|adamw``) become one figure and one table in docs/. The plot's
x axis is tokens seen, optimizer steps, or wall-clock (``elapsed_s``): SOAP's steps cost more than
AdamW's, so loss against time is the fair comparison of the two at equal compute.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from soap_apps.pretrain.data import is_byte_level, loss_unit
from soap_apps.pretrain.metrics import METRICS_FILE, read_records, save_plot


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
    elapsed: list[float]  # elapsed_s of each training record (seconds in the training loop)
    unit: str  # the loss's: nats/byte on a byte-level corpus, else nats/token
    planned_steps: int | None = None  # train.steps of its config.yaml (None: no config to read)

    @property
    def stopped_early(self) -> bool:
        """It ended before its schedule did (an interrupted run): its final losses are not its end."""
        return self.planned_steps is not None and self.steps < self.planned_steps

    def seconds_at(self, step: int) -> float:
        """Wall-clock at ``step``, interpolated between training records (evaluations have none)."""
        steps = [s for s, _ in self.train]
        return float(np.interp(step, steps, self.elapsed))


def summarize(run_dir: str | Path, name: str | None = None) -> RunSummary:
    """Read one run directory's metrics.jsonl; a missing or empty file is an error naming the path."""
    path = Path(run_dir) / METRICS_FILE
    records = read_records(path)
    train = [r for r in records if "loss" in r]
    if not train:
        raise FileNotFoundError(
            f"{path}: no training records; is {run_dir} a finished pretrain run directory?"
        )
    if any("tokens_per_s" not in r or "elapsed_s" not in r for r in train):
        raise ValueError(
            f"{path}: not a pre-training run's metrics (its records have no tokens_per_s or elapsed_s; "
            "a fine-tuning run's?): compare_runs compares runs of launchers/pretrain.py"
        )
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in records if "eval_loss" in r]
    # a resumed run can log the final eval twice; keep the last record per step
    evals = sorted(dict(evals).items())
    config = _config(Path(run_dir))
    return RunSummary(
        name=name or Path(run_dir).name,
        steps=int(train[-1]["step"]),
        tokens=int(train[-1]["tokens"]),
        final_train=float(train[-1]["loss"]),
        final_eval=evals[-1][1] if evals else None,
        tokens_per_s=statistics.median(float(r["tokens_per_s"]) for r in train),
        train=[(int(r["step"]), float(r["loss"])) for r in train],
        evals=evals,
        elapsed=[float(r["elapsed_s"]) for r in train],
        unit=loss_unit(is_byte_level((config.get("data") or {}).get("path"))),
        planned_steps=_planned_steps(config),
    )


def _config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as saved ({} when there is none)."""
    path = run_dir / "config.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    return raw if isinstance(raw, dict) else {}


def _planned_steps(config: dict[str, Any]) -> int | None:
    steps = (config.get("train") or {}).get("steps")
    return steps if isinstance(steps, int) else None


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
        steps = f"{r.steps} of {r.planned_steps} (stopped)" if r.stopped_early else str(r.steps)
        lines.append(
            f"| {r.name} | {steps} | {r.tokens:,} | {r.final_train:.4f} | {held} | {r.tokens_per_s:,.0f} | "
            f"{r.tokens_per_s / base.tokens_per_s:.2f}x |"
        )
    return "\n".join(lines)


X_AXES = {"tokens": "tokens", "step": "optimizer step", "time": "seconds in the training loop (elapsed_s)"}


def plot(runs: list[RunSummary], out: str | Path, title: str = "", x: str = "tokens") -> Path:
    """Training (lines) and held-out (markers) loss of every run against ``x``: tokens seen,
    optimizer steps, or wall-clock ("time": elapsed_s, what the loss costs in seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        raise ValueError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in runs:

        def at(step: int, r: RunSummary = r) -> float:
            return {"tokens": step * r.tokens / r.steps, "step": step, "time": r.seconds_at(step)}[x]

        xs, ys = [at(s) for s, _ in r.train], [v for _, v in r.train]
        (line,) = ax.plot(xs, ys, label=f"{r.name} train")
        if r.evals:
            ax.plot(
                [at(s) for s, _ in r.evals],
                [v for _, v in r.evals],
                "o--",
                color=line.get_color(),
                markersize=4,
                label=f"{r.name} held-out",
            )
    units = sorted({r.unit for r in runs})
    out = Path(out)
    save_plot(fig, ax, out, X_AXES[x], f"loss ({' or '.join(units)})", title, f"loss against {X_AXES[x]}")
    return out


def compare(
    run_dirs: list[str], out: str, names: list[str] | None = None, title: str = "", x: str = "tokens"
) -> dict[str, Any]:
    """The table and the plot (against ``x``: tokens, step or time) of ``run_dirs``."""
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"--names has {len(names)} entries for {len(run_dirs)} run directories")
    runs = [summarize(d, n) for d, n in zip(run_dirs, names or [None] * len(run_dirs), strict=True)]
    warnings = [
        f"{r.name} stopped at step {r.steps} of its {r.planned_steps}: its final losses are not those "
        "at the end of its schedule (resume it with launchers/pretrain.py --resume to finish it)"
        for r in runs
        if r.stopped_early
    ]
    return {"table": table(runs), "plot": str(plot(runs, out, title, x)), "runs": runs, "warnings": warnings}
