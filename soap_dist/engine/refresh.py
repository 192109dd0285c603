"""The one refresh path, and the installs: new eigenbases from the statistics, then into use.

Every rank walks the same plan entries in the same order (so collectives match): statistics of
shared factors go to their owners (``exchange.reduce_to_owners``), each owner decomposes its
factors in chunks (the solver: ``linalg.Solver``), factors whose basis only the owner uses are
installed (or stashed) chunk by chunk at once, and the others travel to the ranks that use them
(``exchange.broadcast_bases``). One process is the one-rank case: nothing is reduced or broadcast.
A new basis from the statistics of step t is used from step t + 1 + refresh_delay on every rank,
whatever the timing (at once on the first call). A mixin of ``SoapEngine`` (engine.core).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels, qr
from ..plan import FactorEntry
from ..stores import BlockDim, FactorStore

Tensor = torch.Tensor
REFRESH_CHUNK_BYTES = 1 << 29  # factors refreshed together are cut so each temporary stays under 512 MiB


def rows_of(positions: list[int], index: Callable[[list[int]], Tensor]) -> slice | Tensor:
    """A slice when the positions are consecutive (a view, no copy), else a device index."""
    if positions == list(range(positions[0], positions[0] + len(positions))):
        return slice(positions[0], positions[0] + len(positions))
    return index(positions)


def per_chunk(store: FactorStore) -> int:
    """How many factors of a store are refreshed together (bounds the temporaries' memory)."""
    return max(1, REFRESH_CHUNK_BYTES // (store.size**2 * store.factors.element_size()))


def consecutive(rows: list[int], contributors: list[int], slots: list[int]) -> slice | None:
    """A slice over ``rows`` when they are consecutive, present and used by one block each."""
    first = rows[0]
    if first < 0 or any(contributors[s] != 1 for s in slots):
        return None
    return slice(first, first + len(rows)) if rows == list(range(first, first + len(rows))) else None


def take(t: Tensor, rows: slice | Tensor) -> Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def put(t: Tensor, rows: slice | Tensor, value: Tensor) -> None:
    if isinstance(rows, slice):
        t[rows].copy_(value)
    else:
        t.index_copy_(0, rows, value)


@dataclass
class Pending:
    """A refreshed basis waiting for its install step (refresh_delay >= 1)."""

    bases: Tensor
    perm: Tensor
    ok: Tensor


class RefreshMixin:
    """The refresh and the installs of ``SoapEngine`` (see engine.core for the attributes)."""

    def _slots_of(self, param_ids: list[int]) -> dict[int, list[int]]:
        wanted = set(param_ids)
        found = {
            size: [k for k, slot in enumerate(store.slots) if slot.param in wanted]
            for size, store in self.stores.items()
        }
        return {size: slots for size, slots in found.items() if slots}

    def _chunks(self, store: FactorStore, slots: list[int]) -> Iterator[tuple[list[int], slice | Tensor]]:
        """Slots in groups whose temporaries stay under REFRESH_CHUNK_BYTES each (bounds peak memory)."""
        per = per_chunk(store)
        for k in range(0, len(slots), per):
            part = slots[k : k + per]
            yield part, rows_of(part, self._index)

    def _refresh(self, param_ids: list[int], first: bool) -> None:
        """New bases for every factor of these parameters: eigh on the first call, else the solver's
        refresh (one power iteration + QR); installed now, stashed, or sent to the ranks using them.
        With ``async_refresh`` a later refresh is launched on the side stream and finished at the
        next step (engine.async_refresh)."""
        start = time.perf_counter()
        if not first and self.side is not None:
            self._launch(param_ids)
            self.counters.refreshes += 1
            self.counters.refresh_seconds += time.perf_counter() - start
            return
        flight = self._decompose(param_ids, first)
        if first:
            self._receive(flight, param_ids, first=True)
            self.counters.eigh_seconds += time.perf_counter() - start
            self._warn_nonfinite(param_ids)
            return
        self.counters.owner_seconds += time.perf_counter() - start
        self.counters.refreshes += 1
        self._schedule_install(flight, param_ids)
        self.counters.refresh_seconds += time.perf_counter() - start
        self._warn_nonfinite(param_ids)

    def _schedule_install(self, flight: Any, param_ids: list[int]) -> None:
        """Install now (refresh_delay 0), or at step t + 1 + refresh_delay once the flight lands."""
        if self.refresh_delay:
            self._inflight.append((self._delay_installs(param_ids), flight, param_ids))
        else:
            self._receive(flight, param_ids, first=False)

    def _delay_installs(self, param_ids: list[int]) -> int:
        """Set these parameters' install step to t + 1 + refresh_delay; return the call that waits
        for their bases (refresh_delay >= 1)."""
        for i in param_ids:
            self.install_step[i] = self.steps[i] + 1 + self.refresh_delay
        return self.calls + 1 + self.refresh_delay

    def _decompose(self, param_ids: list[int], first: bool, launched: list | None = None) -> Any:
        """Reduce, decompose the owned factors chunk by chunk, start the broadcasts: the flight.

        ``launched`` (asynchronous refresh): collect each chunk there instead, broadcast nothing.
        """
        plan, topo = self.plan, self.plan.topology
        wanted = set(param_ids)
        entries = [e for e in plan.entries if e.param in wanted]
        reduced = self.exchange.reduce_to_owners(
            [e for e in entries if plan.needs_reduce(e) and e.owner // topo.shards == topo.replica],
            self._partial_statistic,
        )
        shared: dict[FactorEntry, tuple[Tensor, Tensor, Tensor]] = {}  # results other ranks need
        by_size: dict[int, list[FactorEntry]] = defaultdict(list)
        for e in entries:
            if e.owner == topo.rank:
                by_size[e.size].append(e)
        for size, owned in by_size.items():
            store = self.stores[size]
            slots = [self.entry_slot[e][1] for e in owned]
            per = per_chunk(store)
            for k in range(0, len(owned), per):
                part = (store, owned[k : k + per], slots[k : k + per])
                if launched is None:
                    self._refresh_chunk(*part, reduced, first, shared)
                else:
                    launched.append(self._launch_chunk(*part, self._solve(*part, reduced, first=False)))
            if not first:
                self.counters.factors_refreshed += len(owned)
        return None if launched is not None else self.exchange.broadcast_bases(entries, shared)

    def _solve(
        self, store: FactorStore, part: list[FactorEntry], slots: list[int], reduced: dict, first: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The solver on one chunk of owned factors: (bases, perm, ok)."""
        stat_rows = [store.stat_rows[s] for s in slots]
        if any(e in reduced for e in part) or min(stat_rows) < 0:
            factors = torch.stack(
                [
                    reduced[e] if e in reduced else store.factors[r]
                    for e, r in zip(part, stat_rows, strict=True)
                ]
            )
        else:  # this rank's own statistics: a view when the rows are consecutive
            factors = take(store.factors, rows_of(stat_rows, self._index))
        if first:
            bases, ok = self.solver.first(factors)
            perm = torch.arange(store.size, device=self.device).expand(len(part), store.size)
            return bases, perm, ok
        return self.solver.refresh(factors, take(store.bases, rows_of(slots, self._index)).to(store.dtype))

    def _refresh_chunk(
        self,
        store: FactorStore,
        part: list[FactorEntry],
        slots: list[int],
        reduced: dict[FactorEntry, Tensor],
        first: bool,
        shared: dict[FactorEntry, tuple[Tensor, Tensor, Tensor]],
    ) -> None:
        """Decompose one chunk of owned factors; use at once what only this rank uses."""
        bases, perm, ok = self._solve(store, part, slots, reduced, first)
        self._report_failures(store, slots, ok.tolist(), "eigendecomposition" if first else "refresh")
        self._deliver(store, part, slots, bases, perm, ok, first, shared)

    def _deliver(
        self,
        store: FactorStore,
        part: list[FactorEntry],
        slots: list[int],
        bases: Tensor,
        perm: Tensor,
        ok: Tensor,
        first: bool,
        shared: dict[FactorEntry, tuple[Tensor, Tensor, Tensor]],
    ) -> None:
        """A chunk's results: into ``shared`` for the ranks that use them, into use for this rank."""
        rows = rows_of(slots, self._index)
        local = self._used_here_only(part)
        for n, e in enumerate(part):
            if n not in local:
                shared[e] = (bases[n], perm[n], ok[n])
        if not local:
            return
        if len(local) < len(part):
            pick = self._index(local)
            bases, perm, ok = (
                bases.index_select(0, pick),
                perm.index_select(0, pick),
                ok.index_select(0, pick),
            )
            slots = [slots[n] for n in local]
            rows = rows_of(slots, self._index)
        self._use(store, slots, rows, bases, perm, ok, first)

    def _used_here_only(self, part: list[FactorEntry]) -> list[int]:
        """Positions in ``part`` of the factors whose basis only this rank (their owner) uses."""
        return [n for n, e in enumerate(part) if len(self.plan.broadcast_ranks(e)) == 1]

    def _use(
        self,
        store: FactorStore,
        slots: list[int],
        rows: slice | Tensor,
        bases: Tensor,
        perm: Tensor,
        ok: Tensor,
        first: bool,
    ) -> None:
        """New bases into use, where ``ok``: the first call's at once (no moments to carry yet), later
        ones stashed for their install step (refresh_delay >= 1) or installed now, carrying m and v."""
        if first:
            kept = take(store.bases, rows).to(bases.dtype)
            put(store.bases, rows, torch.where(ok[:, None, None], bases, kept).to(store.basis_dtype))
        elif self.refresh_delay:
            self._stash(store, rows, bases, perm, ok)
        else:
            self._install_rows(store, slots, rows, bases, perm, ok)

    def _partial_statistic(self, entry: FactorEntry) -> Tensor | None:
        store, slot = self.entry_slot.get(entry, (None, -1))
        if store is None or store.stat_rows[slot] < 0:
            return None
        return store.factors[store.stat_rows[slot]]

    def _receive(self, flight: Any, param_ids: list[int], first: bool) -> None:
        """Wait for broadcast bases; put them in (first call) or stash them for their install step."""
        got = flight.wait()
        by_store: dict[int, list[tuple[int, tuple[Tensor, Tensor, Tensor]]]] = defaultdict(list)
        for e, result in got.items():
            if e in self.entry_slot:
                store, slot = self.entry_slot[e]
                by_store[store.size].append((slot, result))
        # Stores in the engine's own order, never the order results arrived in: carrying m through
        # two dims' new bases in another order rounds differently, and replicas would drift apart.
        for size in [size for size in self.stores if size in by_store]:
            store, items = self.stores[size], by_store[size]
            items.sort(key=lambda item: item[0])
            part = [slot for slot, _ in items]
            bases = torch.stack([r[0] for _, r in items]).to(store.dtype)
            perm = torch.stack([r[1] for _, r in items])
            ok = torch.stack([r[2] for _, r in items]).bool()
            self._use(store, part, rows_of(part, self._index), bases, perm, ok, first)
        if not first and not self.refresh_delay:
            self._record_installs(param_ids)

    def complete_inflight(self) -> None:
        """Wait for every outstanding refresh and broadcast (before a checkpoint or a load); installs
        keep their step."""
        with self._refusing_after_a_raise():
            self.join_refresh()
            while self._inflight:
                _, flight, ids = self._inflight.pop(0)
                self._receive(flight, ids, first=False)

    def pending_for(self, store: FactorStore) -> Pending:
        """The stash of refreshed bases waiting for their install step (refresh_delay >= 1)."""
        if store.size not in self.pending:
            n, d = len(store.slots), store.size
            self.pending[store.size] = Pending(
                store.bases.clone(),
                torch.arange(d, device=self.device).repeat(n, 1),
                torch.zeros(n, dtype=torch.bool, device=self.device),
            )
        return self.pending[store.size]

    def _stash(
        self, store: FactorStore, rows: slice | Tensor, bases: Tensor, perm: Tensor, ok: Tensor
    ) -> None:
        pend = self.pending_for(store)
        put(pend.bases, rows, bases.to(pend.bases.dtype))
        put(pend.perm, rows, perm)
        put(pend.ok, rows, ok)

    def _install_pending(self, param_ids: list[int]) -> None:
        for size, slots in self._slots_of(param_ids).items():
            store = self.stores[size]
            pend = self.pending_for(store)
            for part, rows in self._chunks(store, slots):
                bases, perm, ok = take(pend.bases, rows), take(pend.perm, rows), take(pend.ok, rows)
                self._install_rows(store, part, rows, bases, perm, ok)
        self._record_installs(param_ids)
        for i in param_ids:
            self.install_step.pop(i, None)

    def _install_rows(
        self,
        store: FactorStore,
        part: list[int],
        rows: slice | Tensor,
        bases: Tensor,
        perm: Tensor,
        ok: Tensor,
    ) -> None:
        """New bases in where ``ok``, and the moments of the blocks using them carried over.

        m goes from the old basis to the new one along the factor's dim, v is re-indexed by the sort.
        Done per chunk of slots, so no buffer the size of all bases is needed.
        """
        old = take(store.bases, rows).to(store.dtype)
        # the basis as it will be stored (rounded to bf16 bases): m is carried into exactly that one
        new = torch.where(ok[:, None, None], bases.to(store.dtype), old).to(store.basis_dtype).to(store.dtype)
        perm = torch.where(ok[:, None], perm, torch.arange(store.size, device=self.device))
        chunk_row = {slot: r for r, slot in enumerate(part)}
        for stack, dim, bd in self._users[store.size]:
            positions = [k for k, slot in enumerate(bd.slots) if slot in chunk_row]
            if not positions:
                continue
            blocks = rows_of(positions, self._index)
            source = self._index([chunk_row[bd.slots[k]] for k in positions])
            moved = self._carry(
                take(stack.exp_avg, blocks),
                dim,
                old.index_select(0, source),
                new.index_select(0, source),
                ok.index_select(0, source),
                bd,
            )
            put(stack.exp_avg, blocks, moved)
            p = perm.index_select(0, source)
            put(stack.exp_avg_sq, blocks, kernels.permute_along(take(stack.exp_avg_sq, blocks), dim, p))
        put(store.bases, rows, new.to(store.basis_dtype))
        self.counters.count_installs(ok)

    def _carry(self, m: Tensor, dim: int, old: Tensor, new: Tensor, ok: Tensor, bd: BlockDim) -> Tensor:
        """P_new(P_old^-1(m)) along ``dim``; blocks whose refresh failed keep m exactly.

        Either two contractions of m (old^T, then new), or one with T = Q_old^T Q_new at the cost of
        forming T (2 d^3): the first is cheaper when the factor is larger than the block (d^2 > numel),
        e.g. the 4d-row factor of an MLP weight.
        """
        dtype = m.dtype
        if bd.contiguous is not None and bd.store.size**2 > m[0].numel():
            moved = kernels.contract(kernels.contract(m, dim, old.mT.to(dtype)), dim, new.to(dtype))
            return torch.where(ok.view((-1,) + (1,) * (m.dim() - 1)), moved, m)
        eye = torch.eye(bd.store.size, dtype=old.dtype, device=old.device)
        transfer = torch.where(ok[:, None, None], qr.accurate_matmul(old.mT, new), eye)
        return kernels.contract(m, dim, transfer.to(dtype))

    def _record_installs(self, param_ids: list[int]) -> None:
        self.counters.installed_at.extend((i, self.steps[i] + 1) for i in sorted(param_ids))
