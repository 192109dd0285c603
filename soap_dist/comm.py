"""All of soap_dist's communication, in one place.

The engine calls these at the first step (plan check), at every step (finite flags, only when a
parameter is sharded) and at refresh time (statistics to owners, bases from owners). Everything is
coalesced: one flat buffer per (group, owner), never one collective per factor. Collectives are
issued in an order every rank derives from the plan, so they always match up.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .plan import FactorEntry, Plan

Tensor = torch.Tensor
Result = tuple[Tensor, Tensor, Tensor]  # basis [d, d], sort permutation [d], ok flag []


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; torch >= 2.6 has one
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class PlanMismatchError(RuntimeError):
    """The ranks built different plans (different models, options or world layouts)."""


@dataclass
class Groups:
    """Process groups for a replicas x shards grid; ``ranks[t]`` is the global rank of grid rank t."""

    world: dist.ProcessGroup | None
    shard: dist.ProcessGroup | None
    replicate: dist.ProcessGroup | None
    ranks: list[int]


@dataclass
class Traffic:
    """Logical payload bytes this rank put into and took out of collectives."""

    sent: int = 0
    received: int = 0
    reduce_calls: int = 0
    broadcast_calls: int = 0
    small_calls: int = 0  # plan check and per-step finite flags


@dataclass
class BasesInFlight:
    """Asynchronous broadcasts of new bases; ``wait`` returns what this rank needs."""

    works: list = field(default_factory=list)
    unpack: list[tuple[Tensor, list[FactorEntry]]] = field(default_factory=list)
    own: dict[FactorEntry, Result] = field(default_factory=dict)

    def wait(self) -> dict[FactorEntry, Result]:
        for work in self.works:
            work.wait()
        out = dict(self.own)
        for buffer, entries in self.unpack:
            out.update(_unpack(buffer, entries))
        self.works, self.unpack = [], []
        return out


def _piece(size: int) -> int:
    return size * size + size + 1


def _pack(entries: Sequence[FactorEntry], results: dict[FactorEntry, Result], dtype, device) -> Tensor:
    parts = []
    for e in entries:
        basis, perm, ok = results[e]
        parts += [basis.reshape(-1).to(dtype), perm.to(dtype), ok.reshape(1).to(dtype)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)


def _unpack(buffer: Tensor, entries: Sequence[FactorEntry]) -> dict[FactorEntry, Result]:
    out, at = {}, 0
    for e in entries:
        d = e.size
        basis = buffer[at : at + d * d].view(d, d)
        perm = buffer[at + d * d : at + d * d + d].round().long()
        ok = buffer[at + d * d + d] > 0.5
        out[e] = (basis, perm, ok)
        at += _piece(d)
    return out


class Exchange:
    """Collectives of one engine over its grid of ranks."""

    def __init__(self, plan: Plan, groups: Groups, dtype: torch.dtype, device: torch.device) -> None:
        self.plan, self.groups, self.dtype, self.device = plan, groups, dtype, device
        self.topology = plan.topology
        self.traffic = Traffic()

    def _bytes(self, t: Tensor) -> int:
        return t.numel() * t.element_size()

    def _count_small(self, sent: Tensor, received: Tensor) -> None:
        """The plan check and the per-step finite flags: small, but counted."""
        self.traffic.sent += self._bytes(sent)
        self.traffic.received += self._bytes(received)
        self.traffic.small_calls += 1

    # ----- first step -----
    def check_plan(
        self, hashes: list[int], names: list[str], across: tuple[Any, int, int] | None = None
    ) -> None:
        """One small all_gather of (count, plan hash); a second one only to name a mismatch.

        ``across`` = (group, size, rank) checks over another group than the grid's (the replicas of
        an owner grid, which each build their own plan).
        """
        group, world, me = across if across is not None else (self.groups.world, self.topology.world, None)
        me = self.topology.rank if me is None else me
        total = hash(tuple(hashes)) & ((1 << 63) - 1)
        mine = torch.tensor([len(hashes), total], dtype=torch.int64, device=self.device)
        every = torch.empty(world * 2, dtype=torch.int64, device=self.device)
        _all_gather(every, mine, group=group)
        self._count_small(mine, every)
        every = every.view(world, 2)
        if bool((every == every[0]).all()):
            return
        width = int(every[:, 0].max())
        padded = torch.full((width + 1,), -1, dtype=torch.int64, device=self.device)
        padded[0] = len(hashes)
        padded[1 : len(hashes) + 1] = torch.tensor(hashes, dtype=torch.int64)
        table = torch.empty(world * (width + 1), dtype=torch.int64, device=self.device)
        _all_gather(table, padded, group=group)
        table = table.view(world, width + 1).cpu()
        counts = table[:, 0].tolist()
        if len(set(counts)) > 1:
            first = min(counts)
            name = names[first] if first < len(names) else f"parameter {first}"
            raise PlanMismatchError(
                f"SOAP: ranks have different parameter counts {counts} (this rank: {len(hashes)}); "
                f"{name} is missing on ranks {[r for r in range(world) if counts[r] <= first]}. Every "
                "rank must pass the same parameters in the same order."
            )
        for i in range(width):
            column = table[:, i + 1]
            if not bool((column == column[0]).all()):
                name = names[i] if i < len(names) else f"parameter {i} (absent on this rank)"
                ranks = [r for r in range(world) if table[r, i + 1] != table[me, i + 1]]
                raise PlanMismatchError(
                    f"SOAP: ranks disagree on the block/factor plan at parameter {i} ({name}); this rank "
                    f"({me}) differs from ranks {ranks}. Every rank must build the optimizer "
                    "from the same model, parameter order and options."
                )
        raise PlanMismatchError(
            f"SOAP: ranks have different parameter counts {every[:, 0].tolist()}; every rank must pass "
            "the same parameters in the same order."
        )

    # ----- every step -----
    def all_finite(self, flags: Tensor) -> Tensor:
        """Logical AND of per-parameter flags over the shards: a parameter is skipped on every shard if
        any shard saw a non-finite gradient (also: a first gradient is zero only if zero on every shard)."""
        if self.topology.shards == 1:
            return flags
        as_int = flags.to(torch.int32)
        dist.all_reduce(as_int, op=dist.ReduceOp.MIN, group=self.groups.shard)
        self._count_small(as_int, as_int)
        return as_int.bool()

    # ----- refresh -----
    def reduce_to_owners(
        self, entries: Sequence[FactorEntry], partial: Callable[[FactorEntry], Tensor | None]
    ) -> dict[FactorEntry, Tensor]:
        """Sum the partial statistics of shared factors at their owners, one buffer per owner.

        ``entries`` are the shared factors owned inside this rank's replica, in plan order.
        """
        by_owner: dict[int, list[FactorEntry]] = defaultdict(list)
        for e in entries:
            by_owner[e.owner].append(e)
        me = self.topology.rank
        pending = []
        for owner in sorted(by_owner):
            group = by_owner[owner]
            parts = []
            for e in group:
                p = partial(e)
                parts.append(
                    torch.zeros(e.size * e.size, dtype=self.dtype, device=self.device)
                    if p is None
                    else p.reshape(-1).to(self.dtype)
                )
            buffer = torch.cat(parts)
            work = dist.reduce(buffer, dst=self.groups.ranks[owner], group=self.groups.shard, async_op=True)
            self.traffic.reduce_calls += 1
            if owner == me:
                self.traffic.received += self._bytes(buffer) * (self.topology.shards - 1)
                pending.append((work, buffer, group))
            else:
                self.traffic.sent += self._bytes(buffer)
                pending.append((work, None, group))
        out: dict[FactorEntry, Tensor] = {}
        for work, buffer, group in pending:
            work.wait()
            if buffer is None:
                continue
            at = 0
            for e in group:
                out[e] = buffer[at : at + e.size * e.size].view(e.size, e.size)
                at += e.size * e.size
        return out

    def broadcast_bases(
        self, entries: Sequence[FactorEntry], results: dict[FactorEntry, Result]
    ) -> BasesInFlight:
        """Start the owners' broadcasts of new bases; one buffer per (group, owner)."""
        topo, plan = self.topology, self.plan
        flight = BasesInFlight(own={e: r for e, r in results.items() if e.owner == topo.rank})
        scopes: dict[str, dict[int, list[FactorEntry]]] = {
            "world": defaultdict(list),
            "replicas": defaultdict(list),
        }
        for e in entries:
            if len(plan.broadcast_ranks(e)) == 1:
                continue
            if e.shared or topo.shards == 1:
                scopes["world"][e.owner].append(e)
            elif e.shard == topo.shard:
                scopes["replicas"][e.owner].append(e)
        for scope, by_owner in scopes.items():
            group = self.groups.world if scope == "world" else self.groups.replicate
            receivers = topo.world if scope == "world" else topo.replicas
            for owner in sorted(by_owner):
                group_entries = by_owner[owner]
                if owner == topo.rank:
                    buffer = _pack(group_entries, results, self.dtype, self.device)
                    self.traffic.sent += self._bytes(buffer) * (receivers - 1)
                else:
                    numel = sum(_piece(e.size) for e in group_entries)
                    buffer = torch.empty(numel, dtype=self.dtype, device=self.device)
                    self.traffic.received += self._bytes(buffer)
                    flight.unpack.append((buffer, group_entries))
                flight.works.append(
                    dist.broadcast(buffer, src=self.groups.ranks[owner], group=group, async_op=True)
                )
                self.traffic.broadcast_calls += 1
        return flight

    # ----- placement "zero": rows that straddle DeepSpeed partitions -----
    def swap_pieces(self, send: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        """One all_to_all of uneven runs: pieces of flat partitions to their home ranks, or back."""
        received = torch.empty(sum(recv_counts), dtype=send.dtype, device=send.device)
        dist.all_to_all_single(received, send, recv_counts, send_counts, group=self.groups.shard)
        self.traffic.sent += self._bytes(send)
        self.traffic.received += self._bytes(received)
        self.traffic.small_calls += 1
        return received

    # ----- checkpoints -----
    def all_reduce_sum(self, buffer: Tensor) -> Tensor:
        dist.all_reduce(buffer, group=self.groups.world)
        return buffer
