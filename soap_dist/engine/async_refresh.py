"""The asynchronous refresh: launched on the side stream at step t, finished at step t + 1.

Launch (``_launch``, inside ``RefreshStream.launch``): the statistics reduce and the solver run on
the side stream; bases only this rank uses are stashed there; nothing is read on the host. The
solver runs without its host-side fallback (``fallback=False``): a matrix whose CholeskyQR2 broke
down comes back not ok with its power iterate in place of the basis, flagged ``redo``.

Finish (``join_refresh``, at the start of the next step, after the caller's stream joined the side
stream): the host reads the chunks' ok/redo flags (each copy waits only for its own chunk, never
for the step's stream), redoes the flagged matrices with Householder QR exactly as the synchronous
refresh would, reports failures, and starts the basis broadcasts. Install steps are unchanged
(t + 1 + refresh_delay), so the result is the synchronous refresh's, bit for bit, on one stream.
With bf16 bases a stashed power iterate is rounded to bf16 before its redo (the only difference).
A mixin of ``SoapEngine`` (engine.core).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import qr
from ..plan import FactorEntry
from ..stores import FactorStore
from .refresh import rows_of
from .stream import HostCopy

Tensor = torch.Tensor


@dataclass
class LaunchedChunk:
    """One chunk decomposed on the side stream: what the finish step needs of it."""

    store: FactorStore
    part: list[FactorEntry]
    slots: list[int]
    others: list[int]  # positions in ``part`` other ranks use; the rest are stashed already
    shared: tuple[Tensor, Tensor, Tensor] | None  # (bases, perm, ok) of ``others``, in that order
    flags: HostCopy  # [2, len(part)]: ok, redo


@dataclass
class LaunchedRefresh:
    """One asynchronous refresh, from its launch to its finish."""

    param_ids: list[int]
    install_call: int
    chunks: list[LaunchedChunk]
    nonfinite_seen: HostCopy
    marks: tuple[Any, Any] | None = None  # CUDA timing events around the launched work


class AsyncRefreshMixin:
    """Launch and finish of the asynchronous refresh (see engine.core for the attributes)."""

    def _launch(self, param_ids: list[int]) -> None:
        chunks: list[LaunchedChunk] = []
        with self.side.launch():
            start = self.side.mark()
            self._decompose(param_ids, first=False, launched=chunks)
            seen = self.side.to_host(self.nonfinite_seen)
            end = self.side.mark()
        marks = (start, end) if start is not None else None
        install = self._delay_installs(param_ids)
        self._launched.append(LaunchedRefresh(param_ids, install, chunks, seen, marks))

    def _launch_chunk(
        self,
        store: FactorStore,
        part: list[FactorEntry],
        slots: list[int],
        result: tuple[Tensor, Tensor, Tensor],
    ) -> LaunchedChunk:
        """Stash what only this rank uses; keep the rest, and the flags on their way to the host."""
        bases, perm, ok = result
        redo = ~ok & qr.all_finite(bases)  # a breakdown: ``bases`` holds the power iterate
        flags = self.side.to_host(torch.stack([ok, redo]))
        local = self._used_here_only(part)
        others = [n for n in range(len(part)) if n not in local]
        if local:
            pick = self._index(local)
            rows = rows_of([slots[n] for n in local], self._index)
            self._stash(store, rows, *(t.index_select(0, pick) for t in (bases, perm, ok)))
        shared = None
        if others:
            pick = self._index(others)
            shared = tuple(t.index_select(0, pick) for t in (bases, perm, ok))
        return LaunchedChunk(store, part, slots, others, shared, flags)

    def before_drop(self) -> None:
        """This engine is being replaced (a load builds a new one): the caller's stream waits for a
        refresh still running on the side stream. Else the memory the engine frees (factors, bases,
        the stash the refresh writes) goes back to the caller's stream while that refresh still
        uses it. The launched refresh itself is dropped with the engine, on every rank alike."""
        if self.side is not None:
            self.side.join()

    def join_refresh(self) -> None:
        """The caller's stream waits for the side stream; launched refreshes are finished."""
        if self.side is None:
            return
        self.side.join()
        launched, self._launched = self._launched, []
        for refresh in launched:
            shared: dict[FactorEntry, tuple[Tensor, Tensor, Tensor]] = {}
            for chunk in refresh.chunks:
                self._finish_chunk(chunk, shared)
            ids = set(refresh.param_ids)
            entries = [e for e in self.plan.entries if e.param in ids]
            flight = self.exchange.broadcast_bases(entries, shared)
            self._inflight.append((refresh.install_call, flight, refresh.param_ids))
            self._warn_nonfinite(refresh.param_ids, refresh.nonfinite_seen.tolist())
            if refresh.marks is not None:  # the flags read above were the side stream's last work
                start, end = refresh.marks
                end.synchronize()
                self.counters.side_stream_seconds += start.elapsed_time(end) / 1e3

    def _finish_chunk(self, chunk: LaunchedChunk, shared: dict[FactorEntry, Any]) -> None:
        ok, redo = chunk.flags.tolist()
        again = [n for n, r in enumerate(redo) if r]
        if again:  # rare: the synchronous refresh's Householder redo, on the host's word
            self._redo(chunk, again, ok)
        self._report_failures(chunk.store, chunk.slots, ok, "refresh")
        for k, n in enumerate(chunk.others):
            shared[chunk.part[n]] = tuple(t[k] for t in chunk.shared)

    def _redo(self, chunk: LaunchedChunk, again: list[int], ok: list[bool]) -> None:
        """Householder QR of the power iterates a breakdown left in place of bases (stash or shared)."""
        store = chunk.store
        pend = self.pending_for(store)
        kept = {n: k for k, n in enumerate(chunk.others)}  # position in part -> row of chunk.shared
        iterates = torch.stack(
            [
                chunk.shared[0][kept[n]] if n in kept else pend.bases[chunk.slots[n]].to(store.dtype)
                for n in again
            ]
        )
        q, good = qr.orthonormalize_(iterates, "householder")
        for j, (n, g) in enumerate(zip(again, good.tolist(), strict=True)):
            ok[n] = g
            if n in kept:
                chunk.shared[0][kept[n]] = q[j]
                chunk.shared[2][kept[n]] = g
            else:
                pend.bases[chunk.slots[n]] = q[j].to(pend.bases.dtype)
                pend.ok[chunk.slots[n]] = g
