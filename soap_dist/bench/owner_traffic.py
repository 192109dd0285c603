"""``python -m soap_dist.bench.owner_traffic``: per-step traffic and state of owner and fsdp-local, by W.

Shapes only (``plan.costs``, which tests/test_owner.py checks against ``SOAP.stats()``): the busiest
rank's bytes per step (refreshes averaged over k) and the largest rank's state, for the one-layer
gpt2-small-width set of ``python -m soap_dist.bench.scaling --width 0 --vocab 0``. Prints the
markdown table quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..owner_layout import owner_placement
from ..plan import OWNER, Topology, build_plan
from ..plan.costs import rank_costs
from .cli import at_least, int_list
from .param_sets import MODELS, spec_layouts
from .scaling_worker import scaled_specs

MiB = 1 << 20


def table(model: str, layers: int, worlds: Sequence[int], k: int) -> str:
    layouts = spec_layouts(scaled_specs(model, layers, None, None))
    four = [4] * len(layouts)  # float32 values, moments and factors
    cells: dict[str, list[str]] = {"fsdp-local": [], "owner": [], "fsdp-local state": [], "owner state": []}
    for world in worlds:
        owners, splits = owner_placement(layouts, world, 4, four)
        plans = {
            "fsdp-local": (build_plan(layouts, Topology("fsdp-local", 1, world, 0)), None),
            "owner": (build_plan(layouts, Topology(OWNER, 1, world, 0), splits), owners),
        }
        for name, (plan, own) in plans.items():
            costs = rank_costs(plan, 4, four, four, own)
            steps = [c.per_step(k) for c in costs]
            sent, received = max(s for s, _ in steps), max(r for _, r in steps)
            cells[name].append(f"{sent / MiB:.1f} / {received / MiB:.1f}")
            cells[f"{name} state"].append(f"{max(c.state for c in costs) / MiB:.1f}")
    lines = ["| W | " + " | ".join(map(str, worlds)) + " |", "|---" * (len(worlds) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(row) + " |" for name, row in cells.items() if "state" not in name]
    lines += ["", "largest rank's state, MiB:", ""] + lines[:2]
    lines += [f"| {name} | " + " | ".join(row) + " |" for name, row in cells.items() if "state" in name]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m soap_dist.bench.owner_traffic", description=__doc__)
    p.add_argument(
        "--model", choices=sorted(MODELS), default="gpt2-small", help="parameter set (default: %(default)s)"
    )
    p.add_argument("--layers", type=at_least(1), default=1, help="transformer layers (default: %(default)s)")
    p.add_argument(
        "--worlds", type=int_list(1, "2,4,8"), default="2,4,8,16,32,64", help="comma list of world sizes W"
    )
    p.add_argument("-k", type=at_least(1), default=5, help="precondition_frequency (default 5)")
    args = p.parse_args(argv)
    print(table(args.model, args.layers, args.worlds, args.k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
