"""``python -m soap_dist.plan``: per-rank SOAP state, traffic and refresh work for model shapes.

For scales we cannot run: it needs shapes only (no GPU, no process group). The counts are
``plan.costs.rank_costs``, the same that ``SOAP.stats()`` reports on runs we can make.

    python -m soap_dist.plan --model llama-8b --world 64
    python -m soap_dist.plan --model llama-70b --world 512 --shard 8 --block-size 1024
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ..bench.param_sets import LLAMA, MODELS, model_specs, spec_layouts
from ..layout import ParamLayout
from ..owner_layout import owner_placement, spread_params
from . import OWNER, Topology, build_plan
from .costs import RankCosts, prefers_owner, rank_costs

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2}
GiB, MiB = 1 << 30, 1 << 20
LARGE_WORK = 50_000  # tensors x ranks above which the costing takes seconds (llama-70b at W = 512: ~20 s)


@dataclass
class Row:
    name: str
    grid: str
    costs: list[RankCosts]


def layouts_of(model: str, block_size: int | None, max_precond_dim: int) -> list[ParamLayout]:
    return spec_layouts(model_specs(model), block_size, max_precond_dim)


def placements(
    layouts: list[ParamLayout],
    world: int,
    shard: int | None,
    factor_bytes: int,
    moment_bytes: int,
    basis_bytes: int | None = None,
    delayed: bool = False,
) -> list[Row]:
    """The costs of every placement that fits the world (and the HSDP shard size, if given)."""
    n = len(layouts)
    mb, pb = [moment_bytes] * n, [moment_bytes] * n

    def costs(topology: Topology, splits=None, owners=None, grid=None) -> list[RankCosts]:
        plan = build_plan(layouts, topology, splits)
        return rank_costs(plan, factor_bytes, mb, pb, owners, basis_bytes, owner_grid=grid, delayed=delayed)

    rows = [Row("single", "1 process", costs(Topology("single", 1, 1, 0)))]
    if world == 1:
        return rows
    rows.append(Row("replicated", f"{world} x 1", costs(Topology("replicated", world, 1, 0))))
    rows.append(Row("fsdp-local", f"1 x {world}", costs(Topology("fsdp-local", 1, world, 0))))
    groups = [(1, world)]
    if shard is not None and shard < world:
        replicas = world // shard
        rows.append(Row("hsdp", f"{replicas} x {shard}", costs(Topology("hsdp", replicas, shard, 0))))
        groups.append((replicas, shard))
    for replicas, size in groups:  # owner_scope="world": owners over every rank of the mesh
        owners, splits = owner_placement(layouts, size, factor_bytes, mb, replicas=replicas)
        own = costs(Topology(OWNER, 1, world, 0), splits, owners, (replicas, size))
        rows.append(Row("owner", f"{replicas} x {size}", own))
    if len(groups) > 1:  # owner_scope="shard_group": each replica's shard group repeats the owners
        replicas, size = groups[1]
        owners, splits = owner_placement(layouts, size, factor_bytes, mb)
        own = costs(Topology(OWNER, 1, size, 0), splits, owners)
        rows.append(Row("owner(sg)", f"{replicas} x {size}", own * replicas))
    return rows


def _gib(x: float) -> str:
    return f"{x / GiB:9.3f}"


def report(rows: Sequence[Row], k: int, delayed: bool = False) -> str:
    """The table; with ``delayed`` (refresh_delay >= 1) a column of the stash, outside "state"."""
    head = (
        f"{'placement':<11} {'grid':<10} {'stats GiB':>9} {'bases GiB':>9} {'moments':>9} {'state':>9} "
        + (f"{'stash':>9} " if delayed else "")
        + f"{'out MiB/st':>10} {'in MiB/st':>10} {'work max':>9} {'max/mean':>8}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        c = row.costs
        work = [x.refresh_work for x in c]
        mean = sum(work) / len(work)
        steps = [x.per_step(k) for x in c]
        lines.append(
            f"{row.name:<11} {row.grid:<10} {_gib(max(x.statistics for x in c))} "
            f"{_gib(max(x.bases for x in c))} {_gib(max(x.moments for x in c))} "
            f"{_gib(max(x.state for x in c))} "
            + (f"{_gib(max(x.stash for x in c))} " if delayed else "")
            + f"{max(s for s, _ in steps) / MiB:10.1f} {max(r for _, r in steps) / MiB:10.1f} "
            f"{max(work):9.2e} {max(work) / mean if mean else 1.0:8.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m soap_dist.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=[*MODELS, *LLAMA], help="the model's shapes")
    p.add_argument("--world", type=int, required=True, help="data-parallel ranks W")
    p.add_argument(
        "--shard", type=int, default=None, help="HSDP shard-group size S (W must divide by it; default: none)"
    )
    p.add_argument("--block-size", type=int, default=None, help="SOAP's block_size (default: None)")
    p.add_argument(
        "--precondition-frequency", "-k", type=int, default=10, help="refresh every k steps (default: 10)"
    )
    p.add_argument("--max-precond-dim", type=int, default=10000, help="max_precond_dim (default: 10000)")
    p.add_argument(
        "--factor-dtype",
        choices=[d for d in DTYPE_BYTES if d != "bfloat16"],
        default="float32",
        help="SOAP's factor_dtype (default: float32)",
    )
    p.add_argument("--basis-dtype", choices=list(DTYPE_BYTES), default=None, help="default: the factor dtype")
    p.add_argument(
        "--refresh-delay",
        type=int,
        default=0,
        help="SOAP's refresh_delay: >= 1 adds a column for the stash of bases it keeps (default: 0)",
    )
    args = p.parse_args(argv)
    if args.world < 1:
        p.error("--world must be >= 1")
    if args.shard is not None and (args.shard < 1 or args.world % args.shard):
        p.error(f"--shard {args.shard} must divide --world {args.world}")
    if args.block_size is not None and args.block_size < 1:
        p.error("--block-size must be >= 1")
    if args.precondition_frequency < 1:
        p.error(
            "--precondition-frequency/-k must be >= 1 (refresh every k steps), "
            f"got {args.precondition_frequency}"
        )
    if not 0 <= args.refresh_delay < args.precondition_frequency:
        k = args.precondition_frequency
        p.error(f"--refresh-delay must be >= 0 and below -k ({k}), got {args.refresh_delay}")
    if args.max_precond_dim < 1:
        p.error(f"--max-precond-dim must be >= 1, got {args.max_precond_dim}")
    layouts = layouts_of(args.model, args.block_size, args.max_precond_dim)
    if len(layouts) * args.world >= LARGE_WORK:  # the costs grow with tensors x ranks: say why it is quiet
        print(
            f"soap_dist.plan: costing {len(layouts)} tensors over {args.world} ranks for every placement; "
            "this takes a while (it grows with --world)...",
            file=sys.stderr,
            flush=True,
        )
    fb = DTYPE_BYTES[args.factor_dtype]
    params = sum(spec.numel for spec in model_specs(args.model))
    print(
        f"{args.model}: {len(layouts)} tensors, {params / 1e9:.2f} B parameters; W = {args.world}, "
        f"block_size {args.block_size}, k = {args.precondition_frequency}, {args.factor_dtype} factors "
        f"({args.basis_dtype or args.factor_dtype} bases), "
        "float32 moments and values. Per rank, the largest rank's figure; traffic averaged per step.",
        flush=True,
    )
    bb = DTYPE_BYTES[args.basis_dtype] if args.basis_dtype else None
    delayed = args.refresh_delay > 0
    rows = placements(layouts, args.world, args.shard, fb, 4, bb, delayed)
    print(report(rows, args.precondition_frequency, delayed))
    if delayed:
        print(
            "stash: the bases waiting for their install step (refresh_delay >= 1), kept beside the state; "
            "where bases are broadcast, their received buffers are held too for 1 + refresh_delay of "
            "every k steps (docs/design.md, section 3)"
        )
    if args.world > 1:
        fsdp = build_plan(layouts, Topology("fsdp-local", 1, args.world, 0))
        choice = "owner" if prefers_owner(fsdp, fb, [4] * len(layouts)) else "fsdp-local"
        print(f'placement="auto" under FSDP2 at W = {args.world} picks {choice} (docs/design.md, section 6)')
        meshes = [(1, args.world)]
        if args.shard and args.shard < args.world:
            meshes.append((args.world // args.shard, args.shard))
            print('owner(sg): owner_scope="shard_group", owners repeated in each replica\'s shard group')
        for replicas, size in meshes:
            spread = spread_params(layouts, size, fb, [4] * len(layouts), replicas=replicas)
            names = ", ".join(layouts[i].name for i in sorted(spread)) or "none"
            print(f"owner over {replicas} x {size} ranks leaves spread (docs/design.md, section 9): {names}")
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # piped into `head`, which has read enough: no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)
