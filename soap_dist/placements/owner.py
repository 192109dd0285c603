"""Placement "owner" for FSDP2 and HSDP: exact (equals one process at any world size, any block_size).

Each parameter has one owner rank in its shard group (``owner_layout.assign_owners``). Every step:

1. one all_to_all per dtype brings every shard's rows of a parameter's gradient to its owner, which
   then holds the whole gradient;
2. the owner runs the one-process SOAP step on it: statistics, bases and moments exist there only,
   and its refresh is local (no statistics reduce, no basis broadcast). Its engine writes the
   update (the piece one process would apply, in the compute dtype) instead of applying it;
3. a second all_to_all sends each shard the update of the rows it holds, and every rank applies
   it to its own rows with the one-process rule (``engine.apply_update``).

Values never travel, so a step moves gradients in and updates out: a third less than sending the
values in and the updated values back.

A *spread* parameter (``owner_layout.spread_params``: no row factor, too large for one owner) has
no owner: each shard steps its own rows, as under fsdp-local, and only its column factors are
shared (statistics reduced at the refresh, the basis broadcast). Its rows never move.

Under HSDP each replica's shard group does the same, independently: replicas see the same
gradients, so they compute the same owners' updates and no traffic crosses replicas.

Checkpoints: the state of a parameter is the one-process state. Tensors indexed by rows (moments,
row factors, their bases) are handed out as DTensors sharded like the parameter (torch.chunk rows),
the rest as full tensors, identical on every rank. So a checkpoint loads at any world size, under
owner, one process, or fsdp-local with the same ``block_size`` (when that placement's blocks match).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..comm import Groups
from ..layout import ParamLayout
from ..owner_layout import SPREAD, crossing_elements, held_rows, owner_placement
from ..plan import OWNER, Topology, build_plan, local_layouts, rows_of
from ..state_io import load_engine_state, save_engine_state
from ..stores import moment_dtype
from .rows import HomeRowsRunner, apply_updates
from .tensors import Placement, is_dtensor, local, wrapper

Tensor = torch.Tensor
ROW_KEYS = ("exp_avg", "exp_avg_sq")  # plus every "*_0" key of a parameter whose dim 0 has a factor


class OwnerRunner(HomeRowsRunner):
    """The engine of one shard group's owners, its home buffers, and the two exchanges of a step."""

    def __init__(self, soap: Any, layouts: list[ParamLayout], params: Sequence[Tensor], where: Placement):
        grid = where.topology
        self.layouts = layouts
        self.shards, self.shard = grid.shards, grid.shard
        self.world = self.shards  # the runs move inside one shard group
        self.mesh_placement = where
        factor_bytes = torch.empty((), dtype=soap.factor_dtype).element_size()
        moment_bytes = [torch.empty((), dtype=moment_dtype(p.dtype)).element_size() for p in params]
        normalized = [bool(soap.param_groups[lay.group]["normalize_grads"]) for lay in layouts]
        self.owners, splits = owner_placement(layouts, self.shards, factor_bytes, moment_bytes, normalized)
        self.spread = [o == SPREAD for o in self.owners]
        self._spread_layouts = [lay for lay in layouts if self.spread[lay.index]]
        self.topology = Topology(OWNER, 1, self.shards, self.shard)
        plan = build_plan(layouts, self.topology, splits)
        groups = where.groups
        shard_ranks = groups.ranks[grid.replica * self.shards : (grid.replica + 1) * self.shards]
        device = local(params[0]).device if params else torch.device("cpu")
        self.exchange = soap._new_exchange(
            plan, Groups(world=groups.shard, shard=groups.shard, replicate=None, ranks=shard_ranks), device
        )
        soap._check_plan(self.exchange, layouts, soap.param_groups)
        if grid.replicas > 1:  # the replicas' shard groups must have built the same plan too
            replicas = [groups.ranks[r * self.shards + self.shard] for r in range(grid.replicas)]
            soap._check_plan(
                self.exchange, layouts, soap.param_groups, across=(groups.replicate, grid, replicas)
            )
        self.owned = [k for k, o in enumerate(self.owners) if o == self.shard]
        # The owner's engine writes each owned parameter's update into home_updates, in the dtype the
        # step computes in (the moments' and factors' promotion); every rank applies its rows of it.
        update_dtypes = [torch.promote_types(moment_dtype(p.dtype), soap.factor_dtype) for p in params]
        # (a spread parameter's engine takes the rank's own gradient: no home buffer)
        self.home_grads = [
            self._home(lay, p.dtype, device) if not self.spread[lay.index] else None
            for lay, p in zip(layouts, params, strict=True)
        ]
        self.home_updates = [
            self._home(lay, dtype, device) for lay, dtype in zip(layouts, update_dtypes, strict=True)
        ]
        self.update_dtypes = sorted(set(update_dtypes), key=str)  # the second exchange's, every step
        dtypes_only = [torch.empty(0, dtype=p.dtype, device=device) for p in params]  # what the engine reads
        mine = local_layouts(layouts, self.topology, splits)
        self.engine = soap._new_engine(mine, dtypes_only, plan, self.exchange, writes_updates=True)
        self._crossing: dict[tuple[bool, ...], int] = {}
        self._routes: dict[tuple[bool, ...], list[tuple[int, ParamLayout, int, bool, list[int]]]] = {}

    def _home(self, lay: ParamLayout, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The whole parameter's shape at its owner, no rows elsewhere; a spread one's own rows."""
        owner = self.owners[lay.index]
        if owner == SPREAD:
            rows = held_rows(lay, self.shards, self.shard)[1]
        else:
            rows = rows_of(lay) if owner == self.shard else 0
        shape = (rows, *lay.shape[1:]) if lay.shape else (() if rows else (0,))
        return torch.zeros(shape, dtype=dtype, device=device)

    # ----- the step -----
    @torch.no_grad()
    def step(
        self, groups: list[dict], params: list[Tensor], grads: list[Tensor | None], active: list[bool]
    ) -> None:
        """``params``/``grads``: this rank's local rows (FSDP2 shards); ``active``: the same on every rank."""
        self._check_spread_groups(groups)
        self._gather(grads, active, self._crossing_of(active))
        # A parameter's first step only starts its statistics: the engine writes no update for it.
        updated = [a and started for a, started in zip(active, self.engine.started, strict=True)]
        home_grads = [
            (grads[i] if self.spread[i] else self.home_grads[i]) if a else None for i, a in enumerate(active)
        ]
        self.engine.step(groups, self.home_updates, home_grads, active)
        self._scatter_updates(groups, params, updated, self._crossing_of(updated))

    def _check_spread_groups(self, groups: list[dict]) -> None:
        """A spread parameter's rows are stepped apart, which is exact only without normalize_grads
        (it divides a whole block by its RMS); that was checked when the owners were chosen."""
        for lay in self._spread_layouts:
            if groups[lay.group]["normalize_grads"]:
                raise ValueError(
                    f"SOAP (placement owner): param_groups[{lay.group}] has normalize_grads=True, set "
                    f"after the first step; its parameter {lay.name} is spread over the shards (its rows "
                    "are stepped where FSDP2 put them, docs/design.md section 9), where a per-block RMS "
                    "is not one process's. Set normalize_grads before the first step."
                )

    def _crossing_of(self, active: list[bool]) -> int:
        key = tuple(active)
        if key not in self._crossing:
            self._crossing[key] = crossing_elements(self.layouts, self.owners, self.shards, active)
        return self._crossing[key]

    def _rows_at(self, lay: ParamLayout, shard: int) -> tuple[int, int]:
        """(first element, elements) of the flattened parameter that a shard holds."""
        first, count = held_rows(lay, self.shards, shard)
        width = lay.row_elements
        return first * width, count * width

    def _home_run(self, buffer: Tensor, lay: ParamLayout, shard: int) -> Tensor:
        start, n = self._rows_at(lay, shard)
        return buffer.view(-1)[start : start + n]

    def _holders(self, active: list[bool]) -> list[tuple[int, ParamLayout, int, bool, list[int]]]:
        """(index, layout, owner, whether this rank holds rows, the other ranks holding rows if this
        rank is the owner) of every active parameter with an owner (a spread one's rows never move),
        in the order every rank walks them. Cached per pattern of active parameters, which repeats:
        built afresh it costs O(parameters x shards) of Python, 0.24 s at 723 tensors over 512 shards."""
        key = tuple(active)
        if key not in self._routes:
            routes = []
            for lay in self.layouts:
                if not active[lay.index] or self.spread[lay.index]:
                    continue
                owner = self.owners[lay.index]
                others = (
                    [s for s in range(self.shards) if s != self.shard and self._rows_at(lay, s)[1]]
                    if owner == self.shard
                    else []
                )
                routes.append((lay.index, lay, owner, self._rows_at(lay, self.shard)[1] > 0, others))
            self._routes[key] = routes
        return self._routes[key]

    def _gather(self, grads: list, active: list[bool], crossing: int) -> None:
        """Every holder's rows of each active gradient to the parameter's owner."""
        outgoing, incoming = self.new_runs(self.shards)
        for i, lay, owner, mine, others in self._holders(active):
            if owner != self.shard:
                if mine:
                    outgoing[owner].append(grads[i].reshape(-1))
                continue
            if mine:
                self._home_run(self.home_grads[i], lay, self.shard).copy_(grads[i].reshape(-1))
            for s in others:
                incoming[s].append(self._home_run(self.home_grads[i], lay, s))
        if crossing:
            self.move(outgoing, incoming)

    def _scatter_updates(
        self, groups: list[dict], params: list[Tensor], updated: list[bool], crossing: int
    ) -> None:
        """Each holder gets the update of its rows from the owner, and applies it."""
        outgoing, incoming = self.new_runs(self.shards)
        mine_updates: list[tuple[int, Tensor]] = []
        for i, lay, owner, mine, others in self._holders(updated):
            home = self.home_updates[i]
            if owner != self.shard:
                if mine:
                    update = torch.empty(params[i].numel(), dtype=home.dtype, device=home.device)
                    incoming[owner].append(update)
                    mine_updates.append((i, update))
                continue
            if mine:
                mine_updates.append((i, self._home_run(home, lay, self.shard)))
            for d in others:
                outgoing[d].append(self._home_run(home, lay, d))
        if crossing:
            self.move(outgoing, incoming, self.update_dtypes)
        for i, spread in enumerate(self.spread):  # a spread parameter's update is of this rank's rows
            if spread and updated[i] and self.home_updates[i].numel():
                mine_updates.append((i, self.home_updates[i].view(-1)))
        apply_updates(groups, self.layouts, ((i, params[i].view(-1), u) for i, u in mine_updates))

    # ----- checkpoints -----
    def state_dict(self) -> dict[int, dict]:
        """The one-process state of every parameter; row-indexed tensors sharded like the parameters."""
        state = save_engine_state(self.engine, self.exchange)
        moves = [(i, key) for i, key in self._row_keys(state) if not self.spread[i]]
        # a spread parameter's row-indexed tensors are this rank's rows already
        pieces = {(i, key): state[i][key] for i, key in self._row_keys(state) if self.spread[i]}
        outgoing, incoming = self.new_runs(self.shards)
        for i, key in moves:
            lay, t = self.layouts[i], state[i][key]
            per_row = lay.block_rows_per_row
            count = held_rows(lay, self.shards, self.shard)[1]
            mine = t.new_empty((count * per_row, *t.shape[1:]))
            pieces[(i, key)] = mine
            if self.owners[i] == self.shard:
                for d in range(self.shards):
                    first, n = held_rows(lay, self.shards, d)
                    rows = t[first * per_row : (first + n) * per_row]
                    if d == self.shard:
                        mine.copy_(rows)
                    elif n:
                        outgoing[d].append(rows.reshape(-1))
            elif count:
                incoming[self.owners[i]].append(mine.view(-1))
        self.move(outgoing, incoming, _dtypes(state[i][k] for i, k in moves))
        wrap = wrapper(self.mesh_placement)
        for (i, key), mine in pieces.items():
            lay = self.layouts[i]
            shape = (rows_of(lay) * lay.block_rows_per_row, *mine.shape[1:]) if lay.shape else mine.shape
            state[i][key] = wrap(mine, tuple(shape)) if wrap is not None else mine
        return state

    def load_state_dict(self, state: dict[Any, dict], partial: bool = False) -> None:
        """Row-indexed tensors (DTensors or full tensors) travel to the owners, which load them (a spread
        parameter's stay where they are)."""
        full: dict[int, dict] = {}
        moved: list[tuple[int, str]] = []
        outgoing, incoming = self.new_runs(self.shards)
        for lay in self.layouts:
            i = lay.index
            entry = state_of(state, i)
            if entry is None:
                continue
            mine = self.owners[i] == self.shard
            row_keys = self._keys_of(lay, entry)
            out = {k: local(v) for k, v in entry.items() if k not in row_keys}
            if self.spread[i]:  # this rank's rows: its DTensor shard, or its slice of a full tensor
                first, n = held_rows(lay, self.shards, self.shard)
                rows = slice(first * lay.block_rows_per_row, (first + n) * lay.block_rows_per_row)
                out |= {k: local(entry[k]) if is_dtensor(entry[k]) else entry[k][rows] for k in row_keys}
                full[i] = out
                continue
            for key in row_keys:
                value = entry[key]
                if not is_dtensor(value):  # a full tensor: the owner takes it, nothing moves
                    if mine:
                        out[key] = value
                    continue
                moved.append((i, key))
                part = local(value)
                per_row = lay.block_rows_per_row
                whole = part.new_zeros((rows_of(lay) * per_row, *part.shape[1:])) if mine else None
                if mine:
                    out[key] = whole
                for s in range(self.shards):
                    first, n = held_rows(lay, self.shards, s)
                    if not n:
                        continue
                    if s == self.shard and mine:
                        whole[first * per_row : (first + n) * per_row].copy_(part)
                    elif s == self.shard:
                        outgoing[self.owners[i]].append(part.reshape(-1))
                    elif mine:
                        incoming[s].append(whole[first * per_row : (first + n) * per_row].view(-1))
            if not mine:  # this rank holds none of it: empty rows, as its engine expects
                for key in row_keys:
                    t = local(entry[key])
                    out[key] = t.new_empty((0, *t.shape[1:]))
            full[i] = out
        self.move(outgoing, incoming, _dtypes(local(state_of(state, i)[k]) for i, k in moved))
        load_engine_state(self.engine, full, partial=partial)

    @staticmethod
    def _keys_of(lay: ParamLayout, entry: dict) -> list[str]:
        keys = [k for k in ROW_KEYS if k in entry]
        if lay.preconditioned[0]:
            keys += sorted(k for k in entry if k.endswith("_0"))
        return keys

    def _row_keys(self, state: dict[int, dict]) -> list[tuple[int, str]]:
        return [(lay.index, k) for lay in self.layouts for k in self._keys_of(lay, state[lay.index])]


def _dtypes(tensors) -> list[torch.dtype]:
    return sorted({t.dtype for t in tensors}, key=str)


def state_of(state: dict[Any, dict], index: int) -> dict:
    """A parameter's saved entry, keyed by its index (torch.optim) or the index as text."""
    return state.get(index, state.get(str(index)))
