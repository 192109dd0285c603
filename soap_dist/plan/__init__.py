"""The ownership plan: which rank refreshes which factor, from shapes alone.

Every rank builds the same plan with no communication (docs/design.md, section 1). The ranks
of a job form a replicas x shards grid: one process is 1 x 1, DDP is W x 1, FSDP2 is 1 x W and HSDP
is R x S. Shard s holds the rows ``shard_rows(rows, S, s)`` of every parameter (torch.chunk on
dim 0, as FSDP2 cuts); its row blocks have their own row factors. The factors of the other dims
belong to the whole parameter. Owners are chosen by longest-processing-time on the refresh cost
(~d^3) within each factor's locality rule:

- a row factor of shard s can be owned by any replica of that shard (the ranks that hold it);
- a shared (column) factor can be owned by any rank.

Nothing here imports torch.distributed.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..layout import ParamLayout, restrict_rows

PLACEMENTS = ("single", "replicated", "fsdp-local", "hsdp", "owner")
# Picked by soap_dist.deepspeed under ZeRO stages 1-3, never by a user: shard s holds the "home"
# rows that zero_layout assigns it, not torch.chunk's.
ZERO = "zero"
# The engine grid of placement "owner": shard s holds every row of the parameters it owns and none of
# the others (``owner_splits``), so every factor of a parameter lives at its owner alone; a spread
# parameter's rows stay where FSDP2 put them, and its column factors are shared as under fsdp-local.
OWNER = "owner"
Splits = dict[int, list[tuple[int, int]]]  # param -> (first row, row count) of every shard


@dataclass(frozen=True)
class Topology:
    """Where this rank sits in the replicas x shards grid (rank = replica * shards + shard)."""

    placement: str
    replicas: int
    shards: int
    rank: int

    @property
    def world(self) -> int:
        return self.replicas * self.shards

    @property
    def replica(self) -> int:
        return self.rank // self.shards

    @property
    def shard(self) -> int:
        return self.rank % self.shards

    def shard_group(self, replica: int) -> list[int]:
        """Ranks of one replica: together they hold every row of every parameter once."""
        return [replica * self.shards + s for s in range(self.shards)]

    def replica_group(self, shard: int) -> list[int]:
        """Ranks holding the same shard."""
        return [r * self.shards + shard for r in range(self.replicas)]


SINGLE = Topology("single", 1, 1, 0)


def shard_rows(rows: int, shards: int, shard: int) -> tuple[int, int]:
    """(start, count) of the rows shard ``shard`` holds: torch.chunk's rule, as FSDP2 shards dim 0."""
    if shards == 1:
        return 0, rows
    chunk = math.ceil(rows / shards) if rows else 0
    start = min(shard * chunk, rows)
    return start, max(0, min(chunk, rows - start))


@dataclass(frozen=True)
class FactorEntry:
    """One factor of the job: a row factor of (shard, block) or a shared factor (shard = block = -1)."""

    param: int
    dim: int
    shard: int
    block: int
    size: int
    owner: int = -1

    @property
    def cost(self) -> int:
        return self.size**3

    @property
    def shared(self) -> bool:
        return self.dim != 0


@dataclass
class Plan:
    """Every factor of the job with its owner, and this rank's view of them."""

    topology: Topology
    entries: list[FactorEntry]
    holders: dict[int, list[int]] = field(default_factory=dict)  # param -> shards with rows
    layouts: list[ParamLayout] = field(default_factory=list)  # the full parameters'
    splits: Splits | None = None  # rows of each shard when not torch.chunk's (placement "zero")

    def shard_range(self, param: int, shard: int) -> tuple[int, int]:
        """(first row, row count) of a parameter that a shard holds."""
        return _shard_range(self.layouts[param], self.topology, shard, self.splits)

    def row_width(self, param: int) -> int:
        """Width of a parameter's compact row-factor tensor: its largest row block, over all shards."""
        return max((e.size for e in self.entries if e.param == param and not e.shared), default=0)

    def row_start(self, entry: FactorEntry) -> int:
        """First row (block space, full parameter) of a row factor's block."""
        full = self.layouts[entry.param]
        start, count = self.shard_range(entry.param, entry.shard)
        local = restrict_rows(full, count)
        return start * full.block_rows_per_row + local.row_offsets[entry.block]

    def accumulates(self, entry: FactorEntry) -> bool:
        """Whether this rank adds its gradients to the entry's statistic.

        Row factors: the owner (every replica of the shard sees the same gradient). Shared factors:
        the ranks of the owner's replica that hold rows (their partial statistics sum to the whole).
        """
        topo = self.topology
        if not entry.shared:
            return entry.owner == topo.rank
        owner_replica = entry.owner // topo.shards
        return owner_replica == topo.replica and topo.shard in self.holders.get(entry.param, [])

    def keeper(self, entry: FactorEntry) -> int:
        """The rank that holds a shared factor's whole statistic after a checkpoint consolidates it.

        The owner when it holds rows of the parameter, else the first rank of its replica that does
        (an owner with an empty shard keeps no statistic).
        """
        topo = self.topology
        holders = self.holders.get(entry.param, [])
        if entry.owner % topo.shards in holders:
            return entry.owner
        return min(r for r in topo.shard_group(entry.owner // topo.shards) if r % topo.shards in holders)

    def consumes(self, entry: FactorEntry) -> bool:
        """Whether this rank rotates with the entry's basis (it holds rows of the parameter)."""
        topo = self.topology
        if not entry.shared:
            return entry.shard == topo.shard
        return topo.shard in self.holders.get(entry.param, [])

    def spread(self, entry: FactorEntry) -> bool:
        """Under owner: a shared factor of a parameter spread over several shards (owner_layout)."""
        return entry.shared and len(self.holders.get(entry.param, [])) > 1

    def needs_reduce(self, entry: FactorEntry) -> bool:
        """Whether partial statistics on several ranks must be summed at the owner (under owner, only
        for a spread parameter)."""
        if not entry.shared or self.topology.shards == 1:
            return False
        return self.topology.placement != OWNER or self.spread(entry)

    def broadcast_ranks(self, entry: FactorEntry) -> list[int]:
        """Who receives the entry's new basis from its owner (the owner included)."""
        topo = self.topology
        if topo.placement == OWNER and not self.spread(entry):  # the owner holds every row
            return [entry.owner]
        return topo.replica_group(entry.shard) if not entry.shared else list(range(topo.world))

    def owned_cost(self) -> list[int]:
        loads = [0] * self.topology.world
        for e in self.entries:
            loads[e.owner] += e.cost
        return loads

    def owned_bytes(self, element_size: int = 4) -> list[int]:
        loads = [0] * self.topology.world
        for e in self.entries:
            loads[e.owner] += e.size * e.size * element_size
        return loads

    def param_hashes(self, layouts: Sequence[ParamLayout], extras: Sequence[object] = ()) -> list[int]:
        """One 63-bit hash per parameter of everything the plan decided for it.

        ``extras[i]`` adds what else must agree across ranks for parameter i (its group's refresh
        frequency, the refresh delay): a disagreement there would desynchronise the collectives.
        """
        per: dict[int, list[FactorEntry]] = {}
        for e in self.entries:
            per.setdefault(e.param, []).append(e)
        topo = self.topology
        out = []
        for lay in layouts:
            text = repr(
                (
                    topo.placement,
                    topo.replicas,
                    topo.shards,
                    lay.group,
                    lay.shape,
                    lay.permutation,
                    lay.block_shape,
                    lay.preconditioned,
                    [(e.dim, e.shard, e.block, e.size, e.owner) for e in per.get(lay.index, [])],
                    extras[lay.index] if extras else None,
                    self.splits[lay.index] if self.splits is not None else None,
                )
            )
            digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
            out.append(struct.unpack("<q", digest)[0] & ((1 << 63) - 1))
        return out


def rows_of(lay: ParamLayout) -> int:
    return lay.shape[0] if lay.shape else 1


def _shard_range(lay: ParamLayout, topology: Topology, shard: int, splits: Splits | None) -> tuple[int, int]:
    if splits is not None:
        return splits[lay.index][shard]
    return shard_rows(rows_of(lay), topology.shards, shard)


def local_layouts(
    full: Sequence[ParamLayout], topology: Topology, splits: Splits | None = None
) -> list[ParamLayout]:
    """This rank's layouts: the full parameters' decisions on the rows of its own shard."""
    return [restrict_rows(lay, _shard_range(lay, topology, topology.shard, splits)[1]) for lay in full]


def build_plan(full: Sequence[ParamLayout], topology: Topology, splits: Splits | None = None) -> Plan:
    """Every factor of every shard, with owners by longest-processing-time on cost.

    ``splits`` replaces torch.chunk's rows per shard (placement "zero"); each shard's rows must be
    contiguous, and together the shards must hold every row once.
    """
    entries: list[FactorEntry] = []
    holders: dict[int, list[int]] = {}
    for lay in full:
        for s in range(topology.shards):
            count = _shard_range(lay, topology, s, splits)[1]
            if count == 0:
                continue
            holders.setdefault(lay.index, []).append(s)
            local = restrict_rows(lay, count)
            if local.preconditioned[0]:
                for b, n in enumerate(local.row_counts):
                    entries.append(FactorEntry(lay.index, 0, s, b, n))
        if lay.index in holders:
            for j in range(1, len(lay.block_shape)):
                if lay.preconditioned[j]:
                    entries.append(FactorEntry(lay.index, j, -1, -1, lay.block_shape[j]))
    owned = _assign_owners(entries, topology, holders)
    return Plan(topology, owned, holders, list(full), splits)


def _assign_owners(
    entries: list[FactorEntry], topo: Topology, holders: dict[int, list[int]]
) -> list[FactorEntry]:
    """Longest-processing-time: fixed owners first, then the largest factor to the least loaded rank."""
    loads = [0] * topo.world
    owners: dict[int, int] = {}

    def eligible(e: FactorEntry) -> list[int]:
        if topo.placement == OWNER:  # the shard(s) holding the parameter: one, unless it is spread
            return holders[e.param]
        return topo.replica_group(e.shard) if not e.shared else list(range(topo.world))

    order = sorted(
        range(len(entries)),
        key=lambda k: (len(eligible(entries[k])) > 1, -entries[k].cost, _key(entries[k])),
    )
    for k in order:
        ranks = eligible(entries[k])
        best = min(ranks, key=lambda r: (loads[r], r))
        owners[k] = best
        loads[best] += entries[k].cost
    return [FactorEntry(e.param, e.dim, e.shard, e.block, e.size, owners[k]) for k, e in enumerate(entries)]


def _key(e: FactorEntry) -> tuple[int, int, int, int]:
    return (e.param, e.dim, e.shard, e.block)
