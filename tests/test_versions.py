"""The lower bounds pyproject.toml declares are the ones docs/versions.md says were run and passed:
a bound moved in one place and not the other fails here (the runs themselves: .ci/torch_range)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text()  # no tomllib: the suite runs on Python 3.10 too
    bounds = {"Python": re.search(r'^requires-python = ">=([\d.]+)"', text, re.M).group(1)}
    for name in ("torch", "accelerate", "transformers"):
        found = set(re.findall(rf'"{name}>=([\d.]+)"', text))
        assert len(found) == 1, f"pyproject.toml gives {name} the lower bounds {sorted(found)}: give it one"
        bounds[name] = found.pop()
    return bounds


def test_every_declared_lower_bound_is_the_documented_one():
    section = (REPO / "docs" / "versions.md").read_text().split("## The bounds")[1].split("\n## ")[0]
    rows = {
        cells[0].split(" (")[0]: cells[1]
        for line in section.splitlines()
        if line.startswith("| ") and len(cells := [c.strip() for c in line.strip("|").split("|")]) >= 2
    }
    for name, bound in _declared().items():
        assert rows.get(name) == f"`>={bound}`", (name, bound, rows.get(name))
