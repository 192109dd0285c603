"""What a run reports: a progress bar with tokens/s (rank 0), ``metrics.jsonl``, and ``loss.png``.

``metrics.jsonl`` has one JSON object per line: training records
``{"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}`` (loss averaged over the
steps since the previous record and over ranks) and evaluation records ``{"step", "eval_loss"}``.
A resumed run first drops the records past its checkpoint's step, then appends, so the file always
describes one trajectory; its ``elapsed_s`` (seconds in the training loop) continues from the last
kept record, so the wall-clock axis of a split run is the sum of its parts (start-ups excluded).
Only rank 0 writes (through ``soap_apps.jsonl``, fine-tuning's writer too); the other ranks join
the loss all-reduce.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from soap_apps.jsonl import JsonlLog, read_records, records_through
from soap_apps.pretrain.parallel import DistEnv, all_reduce_mean

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Metrics:
    """Per-step bookkeeping for the training loop; ``log_train`` is called by every rank every step."""

    def __init__(
        self,
        run_dir: Path,
        env: DistEnv,
        *,
        start_step: int,
        total_steps: int,
        tokens_per_step: int,
        log_every: int,
        title: str = "",
        unit: str = "nats/token",
        tokens_at_start: int | None = None,
        eval_windows: int | None = None,
        eval_windows_before: int | None = None,
    ) -> None:
        """``title``: loss.png's (config, optimizer, backend, world size); ``unit``: the loss's, as
        ``data.loss_unit`` gives it (nats/byte on a byte-level corpus); ``tokens_at_start``: tokens
        trained through ``start_step`` (the data sampler's count, exact when the global batch changed
        on an earlier resume; default ``start_step * tokens_per_step``); ``eval_windows``: how many
        held-out windows an evaluation scores (written with each held-out loss, compared on resume);
        ``eval_windows_before``: how many the same settings scored before eval_batches counted global
        batches (records of that time do not say)."""
        self.env, self.log_every, self.tokens_per_step = env, log_every, tokens_per_step
        self.title, self.unit, self.eval_windows = title, unit, eval_windows
        self.path = run_dir / METRICS_FILE
        self.plot_path = run_dir / PLOT_FILE
        self.last_train_loss = math.nan
        self.last_record_step: int | None = None  # the step of the latest training record
        self.last_eval_loss = math.nan
        self._loss_sum: torch.Tensor | None = None
        self._count = 0
        self._start = self._mark = time.perf_counter()
        self._elapsed_before = 0.0  # a resumed run's elapsed_s continues from its last kept record
        self._start_step = start_step
        self._tokens_at_start = start_step * tokens_per_step if tokens_at_start is None else tokens_at_start
        self._log = JsonlLog(self.path, env.is_main)
        self._open = env.is_main  # rank 0 until close(): loss.png is drawn once
        self._bar = None
        if env.is_main:
            kept = records_through(self.path, start_step)
            self._elapsed_before = max((r["elapsed_s"] for r in kept if "elapsed_s" in r), default=0.0)
            self._log.replace(kept)
            if (note := held_out_change(kept, eval_windows, eval_windows_before)) is not None:
                print(f"pretrain: {note}", flush=True)
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=f"loss in {unit}",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
            )

    def log_train(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, *, force: bool
    ) -> None:
        """Accumulate this step's loss; every ``log_every`` steps (or when ``force``) write a record.

        The record costs one all-reduce and one host sync, so none happens between records.
        """
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._count += 1
        if self._bar is not None:
            self._bar.update(1)
        if not (force or step % self.log_every == 0):
            return
        mean = all_reduce_mean(self._loss_sum / self._count, self.env).item()
        now = time.perf_counter()
        tokens_per_s = self._count * self.tokens_per_step / max(now - self._mark, 1e-9)
        self.last_train_loss, self.last_record_step = mean, step
        record = {
            "step": step,
            "loss": mean,
            "lr": lr,
            "grad_norm": None if math.isnan(norm := float(grad_norm)) else norm,
            "tokens": self._tokens_at_start + (step - self._start_step) * self.tokens_per_step,
            "tokens_per_s": tokens_per_s,
            "elapsed_s": self._elapsed_before + now - self._start,
        }
        self._loss_sum, self._count, self._mark = None, 0, now
        self._log.write(record)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{mean:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False
            )

    def log_eval(self, step: int, eval_loss: float, *, record: bool = True) -> None:
        """Report a held-out loss (all ranks pass the same value); ``record=False`` only shows it."""
        self.last_eval_loss = eval_loss
        if record:
            windows = {} if self.eval_windows is None else {"eval_windows": self.eval_windows}
            self._log.write({"step": step, "eval_loss": eval_loss, **windows})
        self.note(f"step {step}: eval loss {eval_loss:.4f} {self.unit}")

    def note(self, text: str) -> None:
        """A line on rank 0 above the progress bar (a plain print would land inside its line)."""
        if self._bar is not None:
            self._bar.write(text)
            sys.stdout.flush()  # (tqdm's write does not: a log read as it grows would lag)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def close(self, *, plot: bool = True) -> None:
        """Close the bar; on rank 0 draw loss.png from the whole metrics.jsonl."""
        if self._bar is not None:
            self._bar.close()
        if self._open:
            self._open = False
            if plot:
                plot_losses(read_records(self.path), self.plot_path, title=self.title, unit=self.unit)


def held_out_change(
    kept: list[dict[str, Any]], eval_windows: int | None, eval_windows_before: int | None = None
) -> str | None:
    """What a resumed run says when its held-out losses from here on score another set of windows
    than the records it continues (another eval_batches or global batch, or an earlier version)."""
    before = next((r for r in reversed(kept) if "eval_loss" in r), None)
    if (
        before is None
        or eval_windows is None
        or before.get("eval_windows", eval_windows_before) == eval_windows
    ):
        return None
    if "eval_windows" not in before:
        return (
            f"the held-out losses through step {before['step']} do not say how many windows they scored "
            "(an earlier version; its train.eval_batches counted micro-batches per rank, so with grad_accum "
            f"> 1 they scored another set); from here on each scores {eval_windows}"
        )
    return (
        f"the held-out losses from here on score {eval_windows} windows, those through step {before['step']} "
        f"scored {before['eval_windows']} (another train.eval_batches or global batch): the curve changes set"
    )


def plot_losses(
    records: list[dict[str, Any]], out: Path, *, title: str = "", unit: str = "nats/token"
) -> None:
    """Training and held-out loss against step, written as a PNG (matplotlib's Agg backend: no display).

    The title also goes into the PNG's metadata ("Title"), so a file says which run it shows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out", markersize=4)
    save_plot(fig, ax, out, "optimizer step", f"loss ({unit})", title, f"loss in {unit} against step")


def save_plot(fig: Any, ax: Any, out: str | Path, xlabel: str, ylabel: str, title: str, what: str) -> None:
    """Labels, title, grid and legend, then a PNG whose metadata carries the title (and close)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120, metadata={"Title": title, "Description": what})
    plt.close(fig)
