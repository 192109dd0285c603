"""All of soap_dist's communication, in one place.

The engine calls these at the first step (plan check), at every distributed step (finite flags and
agreement words; under owner and zero, the rows' all_to_alls) and at refresh time (statistics to
owners, bases from owners). Every wait goes through ``guard``, which times out with a message (on CUDA
the waits are stream-ordered and never block the host: see comm.guard). Everything is coalesced: one
flat buffer per (group, owner), never one collective per factor. Collectives are issued in an order
every rank derives from the plan, so they always match up.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..plan import FactorEntry, Plan
from .backends import backend_for, check_backend_serves
from .guard import (
    DEFAULT_TIMEOUT_S,
    CollectiveTimeout,
    Guard,
    PeerFailed,
    arrive_all,
    host_waits_for,
    unheeded_timeout,
)

__all__ = [
    "CollectiveTimeout",
    "Exchange",
    "Groups",
    "PeerFailed",
    "PlanMismatchError",
    "RanksDisagreeError",
    "arrive_all",
]

Tensor = torch.Tensor
Result = tuple[Tensor, Tensor, Tensor]  # basis [d, d], sort permutation [d], ok flag []


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; torch >= 2.6 has one
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class PlanMismatchError(RuntimeError):
    """The ranks built different plans (different models, options or world layouts)."""


class RanksDisagreeError(RuntimeError):
    """After the first step, ranks disagree on something that must be identical (options, refreshes,
    gradients under replicated)."""

    state_unchanged = True  # raised on every rank before anything of the step is applied


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
    small_calls: int = 0  # the rest: plan check, per-step finite flags, rows' all_to_alls (owner, zero)


@dataclass
class BasesInFlight:
    """Asynchronous broadcasts of new bases; ``wait`` returns what this rank needs."""

    works: list = field(default_factory=list)  # (work, name, participants)
    unpack: list[tuple[Tensor, list[FactorEntry]]] = field(default_factory=list)
    own: dict[FactorEntry, Result] = field(default_factory=dict)
    guard: Guard | None = None

    def wait(self) -> dict[FactorEntry, Result]:
        for work, name, participants in self.works:
            self.guard.wait(work, name, participants)
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


def _first_difference(table: Tensor, me: int) -> tuple[int, list[int]] | None:
    """The first column of a (ranks x values) table whose entries differ, and the ranks whose entry
    differs from this rank's; None when every column agrees."""
    for i in range(table.shape[1]):
        column = table[:, i]
        if not bool((column == column[0]).all()):
            return i, [r for r in range(table.shape[0]) if column[r] != column[me]]
    return None


class Exchange:
    """Collectives of one engine over its grid of ranks."""

    # An agreement word equal to this is the rank's abstention (``all_finite``): a word that only some
    # ranks vote on, such as one replica slot's gradient fingerprint, which only that slot's ranks hold.
    NO_VOTE = (1 << 63) - 1

    def __init__(
        self,
        plan: Plan,
        groups: Groups,
        dtype: torch.dtype,
        device: torch.device,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.plan, self.groups, self.dtype, self.device = plan, groups, dtype, device
        backend = None
        if plan.topology.world > 1:
            check_backend_serves(groups, device)
            backend = backend_for(groups.world, device)
            unheeded = unheeded_timeout(device, timeout_s, backend)
            if unheeded is not None and dist.get_rank() == 0:  # one warning, not one per rank
                warnings.warn(unheeded, stacklevel=2)
        self.topology = plan.topology
        self.traffic = Traffic()
        # gloo lets a timed-out wait be waited again: it waits in slices and reads peers' failure notices
        self.guard = Guard(
            timeout_s,
            host_waits=host_waits_for(device, backend),
            rewaits=backend == "gloo",
            ranks=groups.ranks,
        )

    @property
    def step(self) -> int:
        return self.guard.step

    @step.setter
    def step(self, value: int) -> None:
        self.guard.step = value

    def collectives_begun(self) -> int:
        """How many SOAP collectives this rank has waited on (or begun to): the engine compares two
        readings to tell whether a raise came after a step's first collective."""
        return self.guard.seq

    def tell_peers(self, step: int, error: str) -> None:
        """This rank's step ``step`` raised ``error`` and it will not join: the waiting ranks stop."""
        self.guard.post_failure(step, error)

    # ----- who takes part in which group (global ranks) -----
    def world_ranks(self) -> list[int]:
        return list(self.groups.ranks)

    def shard_ranks(self) -> list[int]:
        topo = self.topology
        return [self.groups.ranks[t] for t in topo.shard_group(topo.replica)]

    def replica_ranks(self) -> list[int]:
        topo = self.topology
        return [self.groups.ranks[t] for t in topo.replica_group(topo.shard)]

    def _bytes(self, t: Tensor) -> int:
        return t.numel() * t.element_size()

    def _count_small(self, sent: Tensor, received: Tensor) -> None:
        """The plan check and the per-step finite flags: small, but counted."""
        self.traffic.sent += self._bytes(sent)
        self.traffic.received += self._bytes(received)
        self.traffic.small_calls += 1

    # ----- first step -----
    def check_plan(
        self,
        hashes: list[int],
        names: list[str],
        across: tuple[Any, int, int, list[int]] | None = None,
        identities: list[int] | None = None,
        describe: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        """One small all_gather of (count, plan hash, identity hash); a second one only to name a mismatch.

        ``across`` = (group, size, rank, global ranks) checks over another group than the grid's (the
        replicas of an owner grid, which each build their own plan). ``identities`` are per-parameter
        hashes of what says which tensor it is (names, or a fingerprint of the values under replicated).
        ``describe(i)``: parameter i's plan inputs by name, compared between the ranks to name a mismatch.
        """
        if across is None:
            group, world, me, members = self.groups.world, self.topology.world, self.topology.rank, None
        else:
            group, world, me, members = across
        members = members if members is not None else self.world_ranks()
        identities = identities if identities is not None else [0] * len(hashes)
        total = hash(tuple(hashes)) & ((1 << 63) - 1)
        ident = hash(tuple(identities)) & ((1 << 63) - 1)
        mine = torch.tensor([len(hashes), total, ident], dtype=torch.int64, device=self.device)
        every = torch.empty(world * 3, dtype=torch.int64, device=self.device)
        self.guard.wait(_all_gather(every, mine, group=group, async_op=True), "plan check", members)
        self._count_small(mine, every)
        every = every.view(world, 3)
        if bool((every[:, :2] == every[0, :2]).all()):
            if bool((every[:, 2] == every[0, 2]).all()):
                return
            self._name_identity_mismatch(identities, names, group, world, me, members)
        width = int(every[:, 0].max())
        padded = torch.full((width + 1,), -1, dtype=torch.int64, device=self.device)
        padded[0] = len(hashes)
        padded[1 : len(hashes) + 1] = torch.tensor(hashes, dtype=torch.int64)
        table = torch.empty(world * (width + 1), dtype=torch.int64, device=self.device)
        self.guard.wait(_all_gather(table, padded, group=group, async_op=True), "plan check", members)
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
        differing = _first_difference(table[:, 1:], me)
        if differing is not None:
            i, ranks = differing
            name = names[i] if i < len(names) else f"parameter {i} (absent on this rank)"
            every_one = [None] * world  # counts agree here: every rank has parameter i
            dist.all_gather_object(every_one, describe(i) if describe is not None else {}, group=group)
            differ = [
                f"{key}: {[d.get(key) for d in every_one]} (by rank)"
                for key in every_one[me]
                if len({repr(d.get(key)) for d in every_one}) > 1
            ]
            raise PlanMismatchError(
                f"SOAP: ranks disagree on the block/factor plan at parameter {i} ({name}); this rank "
                f"({me}) differs from ranks {ranks}"
                + (f" in {'; '.join(differ)}" if differ else "")
                + ". Every rank must build the optimizer from the same model, parameter order and options."
            )
        raise PlanMismatchError(
            f"SOAP: ranks have different parameter counts {every[:, 0].tolist()}; every rank must pass "
            "the same parameters in the same order."
        )

    def _name_identity_mismatch(self, identities, names, group, world, me, members) -> None:
        padded = torch.tensor(identities, dtype=torch.int64, device=self.device)
        table = torch.empty(world * len(identities), dtype=torch.int64, device=self.device)
        self.guard.wait(_all_gather(table, padded, group=group, async_op=True), "plan check", members)
        differing = _first_difference(table.view(world, len(identities)).cpu(), me)
        if differing is not None:
            i, ranks = differing
            raise PlanMismatchError(
                f"SOAP: ranks hold different tensors at parameter {i} ({names[i]}): this rank ({me}) "
                f"differs from ranks {ranks} in the parameter's name or, under replicated and HSDP, in a "
                "fingerprint of its initial values (HSDP: of its shard, between the replicas). Every rank "
                "must pass the same parameters in the same order, and replicas hold the same values (DDP: "
                "build SOAP from the wrapped model's parameters; no DDP at all, as with Accelerate on CPU "
                "without use_cpu=True, trains one model per rank; HSDP: initialise every replica alike)."
            )

    def replicas_agree(self, values: list[int], group: Any, members: list[int]) -> list[bool]:
        """Per value, whether every rank of ``group`` (the replicas of one shard) holds the same, at
        build. First a fixed-size (count, hash) all_gather; the values themselves only when the counts
        agree (a count that differs is check_plan's to name: no opinion here, every value True).
        Every member reads the same tables, so they decide alike."""
        n = len(values)
        summary = torch.tensor(
            [n, hash(tuple(values)) & ((1 << 63) - 1)], dtype=torch.int64, device=self.device
        )
        every = torch.empty(2 * len(members), dtype=torch.int64, device=self.device)
        self.guard.wait(_all_gather(every, summary, group=group, async_op=True), "replica check", members)
        every = every.view(len(members), 2).cpu()
        if not bool((every[:, 0] == n).all()) or bool((every[:, 1] == every[0, 1]).all()):
            return [True] * n
        mine = torch.tensor(values, dtype=torch.int64, device=self.device)
        table = torch.empty(len(members) * n, dtype=torch.int64, device=self.device)
        self.guard.wait(_all_gather(table, mine, group=group, async_op=True), "replica check", members)
        table = table.view(len(members), n).cpu()
        return (table == table[0]).all(dim=0).tolist()

    # ----- every step -----
    def _flag_scope(self) -> tuple[Any, list[int]] | None:
        """The ranks that must make the same per-step decisions: all of them when replicas exist
        (replicated, hsdp), else the shard group; None for one rank."""
        topo = self.topology
        if topo.replicas > 1:
            return self.groups.world, self.world_ranks()
        if topo.shards > 1:
            return self.groups.shard, self.shard_ranks()
        return None

    def all_finite(self, flags: Tensor, words: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """AND of per-parameter flags over the ranks (a parameter with a non-finite gradient anywhere is
        skipped everywhere; a first gradient is zero only if zero everywhere), in one all_reduce(MIN)
        with ``words`` (int64) appended as [w, -w]: the second result says, per word, whether every
        rank that voted on it (a word other than ``NO_VOTE``) had the same value. One process: the flags
        as they are, and every word agreed."""
        scope = self._flag_scope()
        if scope is None:
            return flags, None if words is None else torch.ones_like(words, dtype=torch.bool)
        group, members = scope
        parts = [flags.to(torch.int64)]
        if words is not None:  # an abstention is NO_VOTE in both halves: the MIN's identity
            parts += [words, torch.where(words == self.NO_VOTE, words, -words)]
        vector = torch.cat(parts)
        self.guard.wait(
            dist.all_reduce(vector, op=dist.ReduceOp.MIN, group=group, async_op=True),
            "finite-flag all_reduce",
            members,
        )
        self._count_small(vector, vector)
        n = flags.numel()
        if words is None:
            return vector[:n].bool(), None
        k = words.numel()
        return vector[:n].bool(), vector[n : n + k] == -vector[n + k :]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (an error path only: names what the ranks disagree on)."""
        scope = self._flag_scope()
        if scope is None:
            return [value]
        group, members = scope
        out: list[Any] = [None] * len(members)
        dist.all_gather_object(out, value, group=group)
        return out

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
            self.guard.wait(
                work, f"statistics reduce to rank {self.groups.ranks[group[0].owner]}", self.shard_ranks()
            )
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
        flight = BasesInFlight(
            own={e: r for e, r in results.items() if e.owner == topo.rank}, guard=self.guard
        )
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
                work = dist.broadcast(buffer, src=self.groups.ranks[owner], group=group, async_op=True)
                members = self.world_ranks() if scope == "world" else self.replica_ranks()
                flight.works.append((work, f"basis broadcast from rank {self.groups.ranks[owner]}", members))
                self.traffic.broadcast_calls += 1
        return flight

    # ----- placement "zero": rows that straddle DeepSpeed partitions -----
    def swap_pieces(
        self,
        send: Tensor,
        send_counts: list[int],
        recv_counts: list[int],
        over: tuple[Any, list[int]] | None = None,
    ) -> Tensor:
        """One all_to_all of uneven runs: pieces of flat partitions to their home ranks, or back.
        ``over``: (group, its global ranks) when not this grid's shard group (owner under HSDP)."""
        group, members = over if over is not None else (self.groups.shard, self.shard_ranks())
        received = torch.empty(sum(recv_counts), dtype=send.dtype, device=send.device)
        work = dist.all_to_all_single(received, send, recv_counts, send_counts, group=group, async_op=True)
        self.guard.wait(work, "all_to_all of rows", members)
        self.traffic.sent += self._bytes(send)
        self.traffic.received += self._bytes(received)
        self.traffic.small_calls += 1
        return received

    # ----- checkpoints -----
    def all_reduce_sum(self, buffer: Tensor) -> Tensor:
        if self.topology.world == 1:
            return buffer
        work = dist.all_reduce(buffer, group=self.groups.world, async_op=True)
        self.guard.wait(work, "checkpoint all_reduce", self.world_ranks())
        return buffer

    def arrive(self, name: str) -> None:
        """Every rank must reach ``name`` (a collective users might call on one rank): checked through
        the store before any collective, so a missing rank is an error, not a crash or a hang."""
        arrive_all(self.guard, name, self.world_ranks())
