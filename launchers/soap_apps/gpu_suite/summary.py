"""The suite's summary: one table of target vs measured (PASS/FAIL), notes per part, the commands.

Written after every part (summary.md for people, summary.json for tools), so a run cut off midway
still leaves what it measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from soap_apps.gpu_suite.running import Clock, Runner


class Summary:
    """The rows of target vs measured, notes per part and the numbers behind them."""

    def __init__(self, out: Path, header: list[str], smoke: bool) -> None:
        self.out, self.header, self.smoke = out, header, smoke
        self.rows: list[dict[str, Any]] = []
        self.notes: dict[str, list[str]] = {}
        self.numbers: dict[str, Any] = {}

    def check(
        self,
        part: str,
        what: str,
        target: str,
        value: float | None,
        limit: float | None,
        fmt: str = "{:.2f}x",
        note: str = "",
    ) -> None:
        """A row: PASS when value <= limit; NOT MEASURED when value is None."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            measured, verdict = "-", "NOT MEASURED"
        else:
            measured = fmt.format(value)
            verdict = "info" if limit is None else ("PASS" if value <= limit else "FAIL")
        self.rows.append(
            {
                "part": part,
                "what": what,
                "target": target,
                "measured": measured,
                "verdict": verdict,
                "note": note,
                "value": value,
            }
        )

    def skipped(self, part: str, what: str, target: str, why: str) -> None:
        """A row for a measure that could not be taken, and why."""
        self.rows.append(
            {
                "part": part,
                "what": what,
                "target": target,
                "measured": "-",
                "verdict": "SKIPPED",
                "note": why,
                "value": None,
            }
        )

    def note(self, part: str, text: str) -> None:
        self.notes.setdefault(part, []).append(text)

    def write(self, runner: Runner, clock: Clock, done: bool) -> None:
        """summary.md and summary.json as they stand (``done``: the suite has finished)."""
        lines = [
            "# Issue 11: the prepared GPU run"
            + (" (SMOKE: tiny, on the CPU; plumbing only)" if self.smoke else ""),
            "",
        ]
        lines += [f"- {h}" for h in self.header]
        lines += [
            f"- suite wall time: {clock.elapsed():.0f} s" + ("" if done else " (still running or cut off)"),
            "",
        ]
        lines += ["| part | measure | target | measured | verdict | note |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(
                f"| {r['part']} | {r['what']} | {r['target']} | {r['measured']} | **{r['verdict']}** "
                f"| {r['note']} |"
            )
        for part in sorted(self.notes):
            lines += ["", f"## {part}", ""] + [f"- {n}" for n in self.notes[part]]
        lines += [
            "",
            "## Commands",
            "",
            "| command | rc | seconds | timed out | log (in raw.tar.gz) |",
            "|---|---|---|---|---|",
        ]
        for c in runner.commands:
            lines.append(f"| `{c['command']}` | {c['rc']} | {c['seconds']} | {c['timed_out']} | {c['log']} |")
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        payload = {
            "header": self.header,
            "rows": self.rows,
            "notes": self.notes,
            "numbers": self.numbers,
            "commands": runner.commands,
            "smoke": self.smoke,
            "done": done,
        }
        (self.out / "summary.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")


def format_seconds(x: float | None) -> str:
    """A step time as the notes show it: ms under a second, else s; "-" when not measured."""
    return "-" if x is None else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")
