"""What a plan costs each rank: state bytes, refresh work and traffic, counted from shapes alone.

The counts follow the code exactly (``SOAP.stats()`` reports the same numbers on the runs we can
make here: tests/test_owner.py, test_planner_counts_equal_stats_on_every_rank), so they can be
trusted for shapes and world sizes we cannot run: ``python -m soap_dist.plan`` prints them, and
``placement="auto"`` decides with them.

Per rank, in bytes:
- statistics: the factor statistics it keeps (``factor_bytes`` in stats());
- bases: the bases it holds, owned or consumed (``basis_bytes``);
- moments: exp_avg and exp_avg_sq of its rows (``moment_bytes``);
- refresh_work: sum of d^3 over the factors it owns;
- per refresh: statistics reduced to owners and bases broadcast from them (sent, received);
- per step: the all_reduce of finite flags and agreement words (every distributed placement), and
  under owner the two row exchanges (gradients in, updates out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..layout import ParamLayout, restrict_rows
from ..owner_layout import held_rows, step_traffic
from . import OWNER, FactorEntry, Plan

WORD_BYTES = 8  # the per-step all_reduce is int64: a finite flag per parameter, then [w, -w] per word


@dataclass
class RankCosts:
    """One rank's share of a plan (bytes, except refresh_work)."""

    statistics: int = 0
    bases: int = 0
    moments: int = 0
    column_state: int = 0  # statistics and bases of shared (non-row) factors, part of the two above
    refresh_work: int = 0
    refresh_sent: int = 0
    refresh_received: int = 0
    step_sent: int = 0
    step_received: int = 0
    stash: int = 0  # refresh_delay >= 1: the bases waiting for their install step (engine.refresh)

    @property
    def state(self) -> int:
        return self.statistics + self.bases + self.moments

    def per_step(self, k: int) -> tuple[float, float]:
        """Average bytes (sent, received) per step with a refresh every k steps."""
        if k < 1:
            raise ValueError(f"k (the precondition frequency) must be >= 1, got {k}")
        return self.step_sent + self.refresh_sent / k, self.step_received + self.refresh_received / k


def rank_costs(
    plan: Plan,
    factor_bytes: int,
    moment_bytes: Sequence[int],
    param_bytes: Sequence[int],
    owners: Sequence[int] | None = None,
    basis_bytes: int | None = None,
    owner_grid: tuple[int, int] | None = None,
    delayed: bool = False,
) -> list[RankCosts]:
    """Every rank's costs (index = grid rank) under ``plan``; ``owners`` for placement owner.

    ``moment_bytes[i]``/``param_bytes[i]``: parameter i's bytes per moment and per value element;
    ``basis_bytes``: per basis element when bases are stored narrower (bf16) than the factors;
    ``owner_grid``: (replicas, shards) of the HSDP mesh when owner's ranks span all of it (default:
    one shard group, the owner plan's ranks); ``delayed``: refresh_delay >= 1, which keeps a stash of
    the bases a rank uses (each with its int64 permutation row and an ok flag).
    """
    basis_bytes = factor_bytes if basis_bytes is None else basis_bytes
    topo = plan.topology
    R, S, W = topo.replicas, topo.shards, topo.world
    out = [RankCosts() for _ in range(W)]
    for e in plan.entries:
        square = e.size * e.size * factor_bytes
        basis = e.size * e.size * basis_bytes
        keepers, users = _holding(plan, e)
        for r in keepers:
            out[r].statistics += square
        for r in users:
            out[r].bases += basis
            if delayed:
                out[r].stash += basis + e.size * 8 + 1
        if e.shared:
            for r in set(keepers) | users:
                out[r].column_state += square * (r in keepers) + basis * (r in users)
        out[e.owner].refresh_work += e.cost
        _refresh_traffic(plan, e, factor_bytes, out)
    for lay in plan.layouts:
        for s in range(S):
            count = plan.shard_range(lay.index, s)[1]
            if not count:
                continue
            numel = math.prod(restrict_rows(lay, count).block_shape)
            for rep in range(R):
                out[rep * S + s].moments += 2 * numel * moment_bytes[lay.index]
    if W > 1:  # the per-step all_reduce of finite flags and agreement words (engine.step)
        # + one gradient fingerprint per replica slot where ranks hold replicas, and where the slot's
        # ranks also compute the same updates (replicated, hsdp: R > 1) one fused vote (engine.agreement)
        replicated_slots = owner_grid[1] if owner_grid is not None and owner_grid[0] > 1 else 0
        words = 1 + (2 * S if R > 1 else replicated_slots)
        flags = WORD_BYTES * (len(plan.layouts) + 2 * words)
        for c in out:
            c.step_sent += flags
            c.step_received += flags
    if topo.placement == OWNER:
        replicas, shards = owner_grid if owner_grid is not None else (1, S)
        updates = [max(m, factor_bytes) for m in moment_bytes]  # the step's compute dtype
        for r, c in enumerate(out):
            sent, received = step_traffic(plan.layouts, owners, shards, r, param_bytes, updates, replicas)
            c.step_sent += sent
            c.step_received += received
    return out


def _holding(plan: Plan, e: FactorEntry) -> tuple[list[int], set[int]]:
    """Grid ranks keeping the entry's statistic, and ranks holding its basis (comm and the engine's
    FactorStore.materialize, as Plan.accumulates and Plan.consumes decide them)."""
    topo = plan.topology
    R, S = topo.replicas, topo.shards
    if e.shared:
        holders = plan.holders.get(e.param, [])
        keepers = [(e.owner // S) * S + s for s in holders]
        return keepers, {rep * S + s for rep in range(R) for s in holders} | {e.owner}
    return [e.owner], {rep * S + e.shard for rep in range(R)} | {e.owner}


def column_state(plan: Plan, factor_bytes: int, basis_bytes: int | None = None) -> list[int]:
    """Per grid rank, the bytes of shared (non-row) factors' statistics and bases: RankCosts'
    column_state alone, without the rest of rank_costs' work (it runs at every optimizer's build)."""
    basis_bytes = factor_bytes if basis_bytes is None else basis_bytes
    out = [0] * plan.topology.world
    for e in plan.entries:
        if not e.shared:
            continue
        keepers, users = _holding(plan, e)
        square, basis = e.size * e.size * factor_bytes, e.size * e.size * basis_bytes
        for r in set(keepers) | users:
            out[r] += square * (r in keepers) + basis * (r in users)
    return out


def _refresh_traffic(plan: Plan, e: FactorEntry, factor_bytes: int, out: list[RankCosts]) -> None:
    """comm.Exchange's reduce_to_owners and broadcast_bases, as bytes per rank."""
    topo = plan.topology
    square = e.size * e.size * factor_bytes
    R, S, W = topo.replicas, topo.shards, topo.world
    if plan.needs_reduce(e):
        replica = e.owner // S
        for s in range(S):
            r = replica * S + s
            if r == e.owner:
                out[r].refresh_received += square * (S - 1)
            else:
                out[r].refresh_sent += square
    if len(plan.broadcast_ranks(e)) == 1:
        return
    piece = (e.size * e.size + e.size + 1) * factor_bytes
    receivers = list(range(W)) if e.shared or S == 1 else [rep * S + e.shard for rep in range(R)]
    for r in receivers:
        if r == e.owner:
            out[r].refresh_sent += piece * (len(receivers) - 1)
        else:
            out[r].refresh_received += piece


def shard_bytes(layouts: Sequence[ParamLayout], shards: int, param_bytes: Sequence[int]) -> list[int]:
    """Bytes of parameter values each shard holds (torch.chunk rows, as FSDP2 cuts)."""
    return [
        sum(held_rows(lay, shards, s)[1] * lay.row_elements * param_bytes[lay.index] for lay in layouts)
        for s in range(shards)
    ]


def row_blocks_as_one_process(fsdp_plan: Plan) -> bool:
    """Whether fsdp-local's row blocks (cut within each shard) are the ones one process cuts, so that
    it equals one process: true when ``block_size`` divides every shard's rows."""
    for lay in fsdp_plan.layouts:
        if not lay.preconditioned[0]:
            continue
        counts: list[int] = []
        for shard in range(fsdp_plan.topology.shards):
            rows = fsdp_plan.shard_range(lay.index, shard)[1]
            if rows:
                counts += restrict_rows(lay, rows).row_counts
        if tuple(counts) != tuple(lay.row_counts):
            return False
    return True


def prefers_owner(fsdp_plan: Plan, factor_bytes: int, param_bytes: Sequence[int]) -> bool:
    """``placement="auto"`` under FSDP2/HSDP: owner unless fsdp-local is exact (its row blocks are one
    process's) and its per-rank column state (the shared factors' statistics and bases, which do not
    shrink with W) fits within the parameter shard. Auto never trades the one-process result away."""
    if not row_blocks_as_one_process(fsdp_plan):
        return True
    column = max(column_state(fsdp_plan, factor_bytes))
    shard = max(shard_bytes(fsdp_plan.layouts, fsdp_plan.topology.shards, param_bytes))
    return column > shard
