"""From DeepSpeed ZeRO's flat partitions to row blocks: who updates which rows, and what moves.

ZeRO stages 1-3 hand each rank one flat 1-D slice of every parameter group (stages 1/2) or of
every sub-group of parameters (stage 3), cut at arbitrary elements, even mid-row. SOAP's update of a row block
needs the whole block. So every *unit* of rows (a row block when dim 0 has a factor, else one
row) gets a *home*: the rank that holds most of its elements (ties: the lowest rank). Homes only
grow along a parameter, so each rank's home rows are one contiguous range, cut at unit
boundaries: the "shards" of placement "zero". Each step the gradients of the pieces of a home
range that other ranks hold travel to the home, and each piece's update travels back.

Pure functions of shapes and offsets: every rank computes every rank's view with no
communication. Nothing here imports deepspeed or torch.distributed.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .layout import ParamLayout
from .plan import rows_of


@dataclass(frozen=True)
class Fragment:
    """Elements [start, start + numel) of a parameter (flattened), at ``offset`` in a rank's flat slice."""

    param: int
    start: int
    numel: int
    offset: int


@dataclass(frozen=True)
class Piece:
    """A run of elements that moves between a flat slice and a home buffer.

    ``flat_offset`` is in the holder's flat slice, ``home_offset`` in the home rank's buffer of the
    parameter (its home rows, flattened).
    """

    param: int
    flat_offset: int
    home_offset: int
    numel: int


def unit_rows(lay: ParamLayout, normalize_grads: bool) -> int:
    """Rows that must be updated together: a row block when dim 0 has a factor (or the update is
    normalized per block), else a single row (rows are then independent)."""
    rows = rows_of(lay)
    if not (lay.preconditioned[0] or normalize_grads) or rows == 0:
        return 1
    per_row = lay.block_rows_per_row
    if lay.block_size is None or lay.block_size % per_row:
        return rows
    return max(1, lay.block_size // per_row)


def homes(lay: ParamLayout, unit: int, held: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first row, row count) that each rank updates, from the element range (start, numel) each holds.

    ``held[r]`` is rank r's range of the flattened parameter; the ranges are ordered by rank and
    together cover it once.
    """
    rows = rows_of(lay)
    width = lay.row_elements
    size = unit * width
    units = math.ceil(rows / unit) if rows else 0
    owner: list[int] = [-1] * units
    share: dict[int, dict[int, int]] = {}
    for r, (start, numel) in enumerate(held):
        if numel == 0:
            continue
        end = start + numel
        first_full, last_full = math.ceil(start / size), end // size  # units entirely inside [start, end)
        for u in range(first_full, min(last_full, units)):
            owner[u] = r
        for u in {start // size, (end - 1) // size}:
            lo, hi = max(start, u * size), min(end, min((u + 1) * size, rows * width))
            if hi > lo:
                share.setdefault(u, {})[r] = share.get(u, {}).get(r, 0) + hi - lo
    for u, counts in share.items():
        owner[u] = min(counts, key=lambda r: (-counts[r], r))
    if any(o < 0 for o in owner) or any(a > b for a, b in zip(owner, owner[1:], strict=False)):
        raise AssertionError(f"zero_layout: the partitions of {lay.name} do not cover it in rank order")
    out = []
    for r in range(len(held)):
        lo, hi = bisect.bisect_left(owner, r), bisect.bisect_right(owner, r)
        first = lo * unit
        out.append((first, min(hi * unit, rows) - first) if hi > lo else (0, 0))
    return out


def piece(fragment: Fragment, home: tuple[int, int], width: int) -> Piece | None:
    """The part of a fragment inside one rank's home rows (first row, count), or None."""
    first, count = home
    lo = max(fragment.start, first * width)
    hi = min(fragment.start + fragment.numel, (first + count) * width)
    if hi <= lo:
        return None
    return Piece(fragment.param, fragment.offset + lo - fragment.start, lo - first * width, hi - lo)


@dataclass
class Routes:
    """What this rank's flat slice exchanges with the home ranges, for one flat slice.

    ``send[d]``: pieces of my slice that rank d updates (d == me: kept locally). ``recv[s]``: pieces
    of my home rows that rank s holds, in the order s packs them.
    """

    send: list[list[Piece]]
    recv: list[list[Piece]]

    def counts(self, me: int) -> tuple[list[int], list[int]]:
        send = [0 if d == me else sum(p.numel for p in ps) for d, ps in enumerate(self.send)]
        recv = [0 if s == me else sum(p.numel for p in ps) for s, ps in enumerate(self.recv)]
        return send, recv


def routes(
    layouts: Sequence[ParamLayout],
    params: Sequence[int],
    fragments: Sequence[Sequence[Fragment]],
    splits: dict[int, list[tuple[int, int]]],
    me: int,
) -> tuple[Routes, int]:
    """Routes of one flat slice (the parameters ``params``), and the number of elements that cross ranks
    anywhere in the job (0: the exchange can be skipped, on every rank alike)."""
    world = len(fragments)
    send: list[list[Piece]] = [[] for _ in range(world)]
    recv: list[list[Piece]] = [[] for _ in range(world)]
    crossing = 0
    wanted = set(params)
    for holder in range(world):
        for frag in fragments[holder]:
            if frag.param not in wanted or frag.numel == 0:
                continue
            lay = layouts[frag.param]
            width = lay.row_elements
            for home in range(world):
                run = piece(frag, splits[frag.param][home], width)
                if run is None:
                    continue
                if home != holder:
                    crossing += run.numel
                if holder == me:
                    send[home].append(run)
                if home == me:
                    recv[holder].append(run)
    return Routes(send, recv), crossing
