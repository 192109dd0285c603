"""The printed summary: a markdown table that can be pasted into docs/benchmarks.md, and the target checks."""

from __future__ import annotations

import json
import math
import platform
import statistics
from typing import Any

from soap_dist.bench.timing import Result

LABELS = {
    "adamw": "torch AdamW",
    "plain": "plain SOAP (per tensor)",
    "soap_dist": "soap_dist.SOAP",
    "floor": "floor (6 matmuls/block + AdamW)",
}


def write_json(
    path: str, command: str, header: list[str], config: dict, factors: Any, **sections: Any
) -> None:
    """The machine-readable copy of a benchmark run: the same envelope for every bench entry point."""
    payload = {"command": command, "header": header, "config": dict(config), "factors": factors, **sections}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


def describe_cpu() -> str:
    """The CPU model, so that CPU timings can be matched to the machine they came from."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return name


def fmt_time(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(b: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b / 2**10:.0f} KiB"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x"


def table(results: list[Result], k: int, labels: dict[str, str]) -> str:
    floor = next((r for r in results if r.name == "floor"), None)
    fm = floor.median if floor else None
    head = [
        "optimizer",
        "init (1st call)",
        "median step",
        "refresh step",
        f"amortized k={k}",
        "worst step",
        "peak mem",
        "extra mem",
        "median / floor",
        "amortized / floor",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [
            labels.get(r.name, r.name),
            fmt_time(r.init_s),
            fmt_time(r.median),
            fmt_time(r.refresh),
            fmt_time(r.amortized(k)),
            fmt_time(r.worst),
            fmt_bytes(r.peak_bytes),
            fmt_bytes(r.extra_bytes),
            fmt_ratio(r.median, fm),
            fmt_ratio(r.amortized(k), fm),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def comparisons(results: list[Result], k: int, cuda: bool, full_medium: bool) -> list[str]:
    """soap_dist against plain and AdamW, and the issue's targets (each marked PASS/FAIL)."""
    by = {r.name: r for r in results}
    soap, adamw = by.get("soap_dist"), by.get("adamw")
    values = key_ratios(results, k)
    lines: list[str] = []
    if "speedup_vs_plain" in values:
        lines.append(
            f"- soap_dist vs plain: amortized speedup {fmt_ratio(values['speedup_vs_plain'], 1.0)}, "
            f"median-step speedup {fmt_ratio(values['median_speedup_vs_plain'], 1.0)}"
        )
    if soap and adamw:
        lines.append(
            f"- soap_dist vs AdamW: amortized step {fmt_ratio(soap.amortized(k), adamw.median)} "
            f"AdamW's median step"
        )
    for r in results:
        cm = r.cycle_mean(k)
        if r.refresh is not None and cm is not None:
            lines.append(
                f"- {r.name}: mean over one full cycle of {k} steps {fmt_time(cm)} "
                f"(refresh cost above a median step: {fmt_time(r.refresh - r.median)})"
            )
    if soap:
        lines += target_checks(values, k, cuda, full_medium)
    return lines


def key_ratios(results: list[Result], k: int) -> dict[str, float]:
    """The numbers the targets are stated in, for one run of the optimizers (absent: not measured)."""
    by = {r.name: r for r in results}
    soap, plain, floor = (by.get(n) for n in ("soap_dist", "plain", "floor"))
    out: dict[str, float] = {}
    if soap and plain:
        out["speedup_vs_plain"] = plain.amortized(k) / soap.amortized(k)
        out["median_speedup_vs_plain"] = plain.median / soap.median
    if soap and soap.refresh is not None:
        out["refresh_s"] = soap.refresh - soap.median
    if soap and floor:
        out["median_over_floor"] = soap.median / floor.median
        out["amortized_over_floor"] = soap.amortized(k) / floor.median
    return out


def target_checks(values: dict[str, float], k: int, cuda: bool, full_medium: bool) -> list[str]:
    """The issue's targets, each marked PASS/FAIL (CPU: vs plain; GPU: vs the floor)."""
    lines: list[str] = []

    def check(label: str, key: str, limit: float, unit: str = "x") -> None:
        value = values.get(key)
        if value is None or math.isnan(value):
            lines.append(f"- target {label} <= {limit}{unit}: not measured")
            return
        verdict = "PASS" if value <= limit else "FAIL"
        lines.append(f"- target {label} <= {limit}{unit}: {value:.2f}{unit} {verdict}")

    if not cuda and "speedup_vs_plain" in values:
        speedup = values["speedup_vs_plain"]
        lines.append(
            f"- target (CPU) amortized speedup vs plain >= 1.6x: {speedup:.2f}x "
            f"{'PASS' if speedup >= 1.6 else 'FAIL'}"
        )
    if cuda and "median_over_floor" in values:
        note = "" if full_medium else " (stated for gpt2-medium, 24 layers; this run is another set)"
        check("(GPU) per-step / floor" + note, "median_over_floor", 1.3)
        check("(GPU) full refresh time (refresh step - median)" + note, "refresh_s", 0.5, " s")
        check(f"(GPU) amortized k={k} / floor" + note, "amortized_over_floor", 3.0)
    return lines


def across_rounds(rounds: list[list[Result]], k: int, cuda: bool, full_medium: bool) -> list[str]:
    """Each key ratio per round and its median; the targets are checked on the medians."""
    per_round = [key_ratios(results, k) for results in rounds]
    keys = [key for key in per_round[0] if all(key in r for r in per_round)]
    medians = {key: statistics.median(r[key] for r in per_round) for key in keys}
    lines = [
        f"- {key}: " + ", ".join(f"{r[key]:.2f}" for r in per_round) + f" (median {medians[key]:.2f})"
        for key in keys
    ]
    return lines + target_checks(medians, k, cuda, full_medium)
