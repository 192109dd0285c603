"""``python -m soap_dist.bench.owner_traffic``: per-step traffic of owner against fsdp-local, by W.

Shapes only (``plan.costs``, which tests/test_owner.py checks against ``SOAP.stats()``): the busiest
rank's bytes per step, refreshes averaged over k, for the one-layer gpt2-small-width set of
``python -m soap_dist.bench.scaling --width 0 --vocab 0``. Prints the markdown table quoted in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..layout import plan_param
from ..owner_layout import assign_owners, owner_splits
from ..plan import OWNER, Topology, build_plan
from ..plan.costs import rank_costs
from .scaling_worker import scaled_specs

MiB = 1 << 20


def table(model: str, layers: int, worlds: Sequence[int], k: int) -> str:
    specs = scaled_specs(model, layers, None, None)
    layouts = [
        plan_param(
            i,
            0,
            s.name,
            s.shape,
            max_precond_dim=10000,
            merge=False,
            precondition_1d=False,
            data_format="channels_first",
            block_size=None,
        )
        for i, s in enumerate(specs)
    ]
    four = [4] * len(layouts)  # float32 values, moments and factors
    cells: dict[str, list[str]] = {"fsdp-local": [], "owner": []}
    for world in worlds:
        owners = assign_owners(layouts, world, 4, four)
        plans = {
            "fsdp-local": (build_plan(layouts, Topology("fsdp-local", 1, world, 0)), None),
            "owner": (
                build_plan(layouts, Topology(OWNER, 1, world, 0), owner_splits(layouts, owners, world)),
                owners,
            ),
        }
        for name, (plan, own) in plans.items():
            steps = [c.per_step(k) for c in rank_costs(plan, 4, four, four, own)]
            sent, received = max(s for s, _ in steps), max(r for _, r in steps)
            cells[name].append(f"{sent / MiB:.1f} / {received / MiB:.1f}")
    lines = ["| W | " + " | ".join(map(str, worlds)) + " |", "|---" * (len(worlds) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(row) + " |" for name, row in cells.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m soap_dist.bench.owner_traffic", description=__doc__)
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--worlds", default="2,4,8,16,32,64")
    p.add_argument("-k", type=int, default=5, help="precondition_frequency (default 5)")
    args = p.parse_args(argv)
    print(table(args.model, args.layers, [int(w) for w in args.worlds.split(",")], args.k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
