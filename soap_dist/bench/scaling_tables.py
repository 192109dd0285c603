"""The scaling benchmark's tables: one row per (world, placement, delay), ratios against world 1."""

from __future__ import annotations

import math
from typing import Any

from soap_dist.bench.report import fmt_bytes, fmt_ratio, fmt_time


def fmt(x: float | None, kind: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if kind == "t":
        return fmt_time(x)
    if kind == "b":
        return fmt_bytes(int(x)) if x >= 1024 or x == 0 else f"{x:.0f} B"
    return str(x)


def main_table(rows: list[dict[str, Any]], base: dict[tuple[str, int], dict[str, Any]], k: int) -> str:
    """One markdown row per (world, placement, delay), with ratios to world 1 so scaling reads directly."""
    head = [
        "world",
        "placement",
        "delay",
        "refresh time / refresh (max rank)",
        "x W1",
        "state bytes (max rank)",
        "x W1",
        "+ pending stash",
        "x W1",
        "sent / refresh (max rank)",
        "recv / refresh (max rank)",
        "sent / step, avg (max rank)",
        "median step",
        "x W1",
        "refresh step",
        f"mean of {k} steps",
        "x W1",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = base.get((r["requested"], r["refresh_delay"]))
        cells = [
            str(r["world"]),
            r["placement"],
            str(r["refresh_delay"]),
            fmt(r["refresh_s"], "t"),
            fmt_ratio(r["refresh_s"], b["refresh_s"]) if b else "-",
            fmt(r["state_bytes"], "b"),
            fmt_ratio(r["state_bytes"], b["state_bytes"]) if b else "-",
            fmt(r["state_with_pending_bytes"], "b"),
            fmt_ratio(r["state_with_pending_bytes"], b["state_with_pending_bytes"]) if b else "-",
            fmt(r["sent_per_refresh"], "b"),
            fmt(r["received_per_refresh"], "b"),
            fmt(r["sent_per_step"], "b"),
            fmt(r["median_step_s"], "t"),
            fmt_ratio(r["median_step_s"], b["median_step_s"]) if b else "-",
            fmt(r["refresh_step_s"], "t"),
            fmt(r["cycle_mean_s"], "t"),
            fmt_ratio(r["cycle_mean_s"], b["cycle_mean_s"]) if b else "-",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def rank_table(rows: list[dict[str, Any]]) -> str:
    """One row per rank: shows the owner imbalance and where each rank's bytes go, which a max hides."""
    head = [
        "world",
        "placement",
        "delay",
        "rank",
        "factors owned",
        "owned cost (sum d^3)",
        "refresh time / refresh",
        "of which before bcast",
        "factors",
        "bases",
        "moments",
        "pending bases (not in stats)",
        "sent / refresh",
        "recv / refresh",
        "collectives / refresh",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for p in r["per_rank"]:
            cells = [
                str(r["world"]),
                r["placement"],
                str(r["refresh_delay"]),
                str(p["rank"]),
                str(p["factors_owned"]),
                f"{p['owned_refresh_cost'] / 1e9:.2f}e9",
                fmt(p["refresh_s"], "t"),
                fmt(p["owner_s"], "t"),
                fmt(p["factor_bytes"], "b"),
                fmt(p["basis_bytes"], "b"),
                fmt(p["moment_bytes"], "b"),
                fmt(p["pending_bytes"], "b"),
                fmt(p["sent_per_refresh"], "b"),
                fmt(p["received_per_refresh"], "b"),
                "-" if p["collectives_per_refresh"] is None else f"{p['collectives_per_refresh']:.0f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


NOTES = [
    "- refresh time / refresh: stats() refresh_seconds per refresh (first call excluded). With delay 0 it "
    "includes waiting for the owners' broadcasts and installing the bases (carrying the moments); with "
    "delay >= 1 it is the owner work and the start of the broadcasts only (the wait and the install fall "
    "in the install step, t = jk + 1 + delay). 'of which before bcast' is stats() owner_seconds.",
    "- state bytes: stats() factor_bytes + basis_bytes + moment_bytes. '+ pending stash' adds the engine's "
    "buffer of refreshed bases waiting to be installed (engine.pending: bases, perms, flags), which stats() "
    "does not count; it exists only with refresh_delay >= 1 (delay 0 installs the bases directly).",
    "- bytes: stats()' logical payload counters (a broadcast's sender counts its buffer once per receiver), "
    "after the first call: they include the per-step all_reduce of finite flags and agreement words; the "
    "plan all_gather, which stats() counts too, falls in the first call. 'sent / step, avg' = all bytes "
    "sent after the first call / steps.",
    "- owner: each parameter's whole state at one rank; its bytes include the two row exchanges of every "
    "step (gradients to the owner, each row's update back), and nothing at refresh time.",
    "- fsdp-local with block_size=None: each shard's rows get their own row factors, so a refresh at "
    "world W is different (smaller) work than at world 1 and its parameters differ from world 1 by design.",
    "- parameters vs world 1: replicated is the same algorithm, but not bitwise: a rank that keeps only some "
    "of a stack's statistics takes another kernel path, and where a factor is rank-deficient at the first "
    "call (rows > cols: G G^T has rank <= cols) the eigenvectors of its zero eigenvalue are arbitrary, so "
    "rounding-level differences become different bases and O(update) parameter differences.",
]
