"""Reading what the commands leave: a run's metrics.jsonl, the step benchmark's JSON, a config's YAML.

Stdlib only, and tolerant of files cut short by a timeout: a part still reports what was measured.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl records; none when the run wrote none, a line cut short left out."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a timeout
            pass
    return out


def per_step_seconds(records: list[dict[str, Any]]) -> dict[int, float]:
    """Seconds of each logged interval, per step, keyed by the interval's last step: only intervals
    with no held-out evaluation in them (an eval record between two training records)."""
    out: dict[int, float] = {}
    prev: dict[str, Any] | None = None
    eval_since = False
    for r in records:
        if "eval_loss" in r:
            eval_since = True
            continue
        if "loss" not in r:
            continue
        if prev is not None and not eval_since and r["step"] > prev["step"]:
            out[r["step"]] = (r["elapsed_s"] - prev["elapsed_s"]) / (r["step"] - prev["step"])
        prev, eval_since = r, False
    return out


def mean_step(records: list[dict[str, Any]], after: int) -> tuple[float | None, int]:
    """Mean seconds per step over the clean intervals ending after step ``after`` (and the step count)."""
    train = [r for r in records if "loss" in r]
    secs = per_step_seconds(records)
    steps_of = {r["step"]: r["step"] - p["step"] for p, r in zip(train, train[1:], strict=False)}
    kept = [(s, dt) for s, dt in secs.items() if s - steps_of.get(s, 1) >= after]
    n = sum(steps_of.get(s, 1) for s, _ in kept)
    return (sum(dt * steps_of.get(s, 1) for s, dt in kept) / n if n else None), n


def elapsed_at(records: list[dict[str, Any]], step: int) -> float | None:
    """Seconds in the loop at ``step``, interpolated between training records."""
    train = [(r["step"], r["elapsed_s"]) for r in records if "loss" in r]
    if not train or step > train[-1][0]:
        return None
    prev = (0, 0.0)
    for s, e in train:
        if s >= step:
            return prev[1] + (e - prev[1]) * (step - prev[0]) / max(1, s - prev[0])
        prev = (s, e)
    return None


def evals(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, held-out loss) of every evaluation, by step."""
    return sorted({int(r["step"]): float(r["eval_loss"]) for r in records if "eval_loss" in r}.items())


def flat_yaml(path: Path) -> dict[str, str]:
    """``section.key -> raw value`` of a two-level YAML file like configs/pretrain/*.yaml (stdlib only)."""
    out, section = {}, ""
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].rstrip()
        if not text.strip():
            continue
        if not line.startswith(" ") and text.endswith(":"):
            section = text[:-1].strip()
        elif ":" in text:
            key, value = text.strip().split(":", 1)
            out[f"{section}.{key.strip()}"] = value.strip()
    return out


def bench_numbers(path: Path) -> dict[str, Any] | None:
    """What part a checks, from a ``soap_dist.bench --json`` file: soap_dist's times and their ratios to
    the matmul floor; None when either result is missing."""
    data = json.loads(path.read_text())
    results = data.get("results") or []
    if results and isinstance(results[0], list):  # --rounds > 1
        results = results[-1]
    by = {r["name"]: r for r in results}
    soap, floor = by.get("soap_dist"), by.get("floor")
    if soap is None or floor is None:
        return None
    k = int(data.get("config", {}).get("precondition_frequency") or 10)
    times = [float(t[1]) for t in soap["steps"]]
    median_all = statistics.median(times)
    fl = floor["median_s"]
    refresh = soap["refresh_s"] - soap["median_s"] if soap.get("refresh_s") is not None else None
    cycle = soap.get("cycle_mean_s")
    return {
        "k": k,
        "floor_s": fl,
        "median_s": soap["median_s"],
        "refresh_step_s": soap.get("refresh_s"),
        "refresh_s": refresh,
        "amortized_s": soap["amortized_s"],
        "worst_s": soap["worst_s"],
        "median_all_s": median_all,
        "cycle_mean_s": cycle,
        "init_s": soap["init_s"],
        "median_over_floor": soap["median_s"] / fl,
        "amortized_over_floor": soap["amortized_s"] / fl,
        "worst_over_median_all": soap["worst_s"] / median_all,
        "cycle_over_floor": None if cycle is None else cycle / fl,
        "peak_bytes": soap.get("peak_bytes"),
    }
