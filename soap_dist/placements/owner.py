"""Placement "owner" for FSDP2 and HSDP: exact (equals one process at any world size, any block_size).

Each parameter has one owner rank (``owner_layout.assign_owners``). Every step:

1. one all_to_all per dtype, inside the owner's shard group, brings every shard's rows of a
   parameter's gradient to its owner, which then holds the whole gradient (none when no rows
   cross shards);
2. the owner runs the one-process SOAP step on it: statistics, bases and moments exist there only,
   and its refresh is local (no statistics reduce, no basis broadcast). Its engine writes the
   update (the piece one process would apply, in the compute dtype) instead of applying it;
3. a second all_to_all sends each shard the update of the rows it holds, and every rank applies
   it to its own rows with the one-process rule (``engine.apply_update``).

Values never travel, so a step moves gradients in and updates out: a third less than sending the
values in and the updated values back.

A *spread* parameter (``owner_layout.spread_params``: no row factor, too large for one owner) has
no owner: each rank steps its own rows, as under fsdp-local, and only its column factors are
shared (statistics reduced at the refresh, the basis broadcast). Its rows never move to an owner.

Under HSDP (``owner_scope="world"``, the default) the owners are spread over every rank of the
mesh, so the state shrinks as 1/W: an owner gathers the gradient from its own replica's shard group
(every replica holds the same reduced gradient), and after step 3 one more all_to_all per dtype, in
the replicate group, gives every replica the update of its rows (a spread parameter's shard rows
are cut among the replicas, each stepping its part). With ``owner_scope="shard_group"`` each
replica's shard group repeats the same owners' work instead: nothing crosses replicas, and the
state shrinks with the shard group only.

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
from ..state_check import entry_of
from ..state_io import load_engine_state, save_engine_state
from ..stores import moment_dtype
from .rows import HomeRowsRunner, Runs, apply_updates
from .tensors import Placement, is_dtensor, local, wrapper

Tensor = torch.Tensor
ROW_KEYS = ("exp_avg", "exp_avg_sq")  # plus every "*_0" key of a parameter whose dim 0 has a factor
OWNER_SCOPES = ("world", "shard_group")
Piece = tuple[int, int, int, int]  # (rank stepping the rows, rank holding them in the mesh, first, end)


class OwnerRunner(HomeRowsRunner):
    """The engine of the owners, its home buffers, and the exchanges of a step.

    Ranks are numbered ``replica * shards + shard`` over the replicas the owners span (all of them
    under HSDP with ``owner_scope="world"``, else one): ``self.rank`` among ``self.ranks``.
    """

    def __init__(self, soap: Any, layouts: list[ParamLayout], params: Sequence[Tensor], where: Placement):
        grid = where.topology
        self.layouts = layouts
        self.shards, self.shard = grid.shards, grid.shard
        across = grid.replicas > 1 and soap.owner_scope == "world"
        self.replicas, self.replica = (grid.replicas, grid.replica) if across else (1, 0)
        self.ranks, self.rank = self.replicas * self.shards, self.replica * self.shards + self.shard
        self.world = self.shards  # the gradient and update exchanges move inside one shard group
        self.mesh_placement = where
        factor_bytes = torch.empty((), dtype=soap.factor_dtype).element_size()
        moment_bytes = [torch.empty((), dtype=moment_dtype(p.dtype)).element_size() for p in params]
        normalized = [bool(soap.param_groups[lay.group]["normalize_grads"]) for lay in layouts]
        self.owners, self.splits = owner_placement(
            layouts, self.shards, factor_bytes, moment_bytes, normalized, replicas=self.replicas
        )
        self.spread = [o == SPREAD for o in self.owners]
        self._spread_layouts = [lay for lay in layouts if self.spread[lay.index]]
        self.topology = Topology(OWNER, 1, self.ranks, self.rank)
        plan = build_plan(layouts, self.topology, self.splits)
        groups = where.groups
        shard_ranks = groups.ranks[grid.replica * self.shards : (grid.replica + 1) * self.shards]
        self.shard_group = (groups.shard, shard_ranks)
        self.replica_group = (groups.replicate, [groups.ranks[t] for t in grid.replica_group(self.shard)])
        self.scope = (groups.world, list(groups.ranks)) if across else self.shard_group
        device = local(params[0]).device if params else torch.device("cpu")
        scope_group, scope_ranks = self.scope
        self.exchange = soap._new_exchange(
            plan, Groups(world=scope_group, shard=scope_group, replicate=None, ranks=scope_ranks), device
        )
        # Under HSDP one check over the whole mesh, whatever the scope: every shard group must have built
        # the same plan, and ranks that disagree on owner_scope fail here instead of waiting in
        # different groups' collectives.
        whole_mesh = (groups.world, grid.world, grid.rank, list(groups.ranks)) if grid.replicas > 1 else None
        soap._check_plan(self.exchange, layouts, soap.param_groups, across=whole_mesh, params=params)
        self.owned = [k for k, o in enumerate(self.owners) if o == self.rank]
        # The owner's engine writes each owned parameter's update into home_updates, in the dtype the
        # step computes in (the moments' and factors' promotion); every rank applies its rows of it.
        update_dtypes = [torch.promote_types(moment_dtype(p.dtype), soap.factor_dtype) for p in params]
        # (a spread parameter's engine takes its rows of the rank's own gradient: no home buffer)
        self.home_grads = [
            self._home(lay, p.dtype, device) if not self.spread[lay.index] else None
            for lay, p in zip(layouts, params, strict=True)
        ]
        self.home_updates = [
            self._home(lay, dtype, device) for lay, dtype in zip(layouts, update_dtypes, strict=True)
        ]
        self.update_dtypes = sorted(set(update_dtypes), key=str)  # the update exchanges', every step
        dtypes_only = [torch.empty(0, dtype=p.dtype, device=device) for p in params]  # what the engine reads
        mine = local_layouts(layouts, self.topology, self.splits)
        self.engine = soap._new_engine(mine, dtypes_only, plan, self.exchange, writes_updates=True)
        if self.replicas > 1:  # the replicas of a shard hold the same gradient rows: compared every step
            self.engine.replica_slots = (self.shards, self.shard)
        self._crossing: dict[tuple[bool, ...], int] = {}
        self._routes: dict[tuple[bool, ...], list[tuple[int, ParamLayout, int, bool, list[int]]]] = {}

    def stepped_rows(self, lay: ParamLayout, rank: int) -> tuple[int, int]:
        """(first row, row count) of a parameter that a rank steps (``owner_layout.owner_splits``): all
        at its owner, none elsewhere; of a spread one, ``owner_layout.spread_rows``."""
        return self.splits[lay.index][rank]

    def _home(self, lay: ParamLayout, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The rows this rank steps, in the parameter's shape (the whole parameter at its owner)."""
        rows = self.stepped_rows(lay, self.rank)[1]
        shape = (rows, *lay.shape[1:]) if lay.shape else (() if rows else (0,))
        return torch.zeros(shape, dtype=dtype, device=device)

    # ----- the step -----
    @torch.no_grad()
    def step(
        self, groups: list[dict], params: list[Tensor], grads: list[Tensor | None], active: list[bool]
    ) -> None:
        """``params``/``grads``: this rank's local rows (FSDP2 shards); ``active``: which have a gradient
        (the engine's agreement checks that every rank says the same)."""
        self._check_spread_groups(groups)
        for i, a in enumerate(active):  # on every rank (each has a local gradient, maybe empty)
            if a and grads[i].dtype != params[i].dtype:
                raise TypeError(
                    f"SOAP (placement owner): {self.layouts[i].name} has a {grads[i].dtype} gradient for "
                    f"{params[i].dtype} values; the rows travel in the values' dtype, so cast the gradient "
                    "to it before step()"
                )
        # Agreed first, on this rank's rows: the gather's sizes follow the parameters stepped, so ranks
        # that differ there must stop before it (else a collective of mismatched sizes).
        agreed = self.engine.agree(groups, grads, active)
        if agreed is None:
            return
        active = agreed.active
        self._gather(grads, active, self._crossing_of(active))
        # A parameter's first step only starts its statistics: the engine writes no update for it.
        updated = [a and started for a, started in zip(active, self.engine.started, strict=True)]
        home_grads = [
            None
            if not a
            else self._own_part(self.layouts[i], grads[i])
            if self.spread[i]
            else self.home_grads[i]
            for i, a in enumerate(active)
        ]
        self.engine.apply(agreed, self.home_updates, home_grads)
        self._scatter_updates(groups, params, updated, self._crossing_of(updated))

    def _own_part(self, lay: ParamLayout, rows: Tensor | None) -> Tensor | None:
        """This rank's part of its shard's rows of a spread parameter (all of them without replicas)."""
        if rows is None or self.replicas == 1:
            return rows
        return rows.narrow(0, *self._part_rows(lay, self.replica))

    def _part_rows(self, lay: ParamLayout, replica: int) -> tuple[int, int]:
        """(first row within this shard's rows, row count) that a replica steps of a spread parameter."""
        first, count = self.stepped_rows(lay, replica * self.shards + self.shard)
        return first - held_rows(lay, self.shards, self.shard)[0], count

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
        """(index, layout, owner's shard, whether this rank holds rows, the other shards holding rows
        if this rank is the owner) of every active parameter owned in this rank's replica (a spread
        one's rows never move to an owner), in the order every rank walks them. Cached per pattern
        of active parameters, which repeats: built afresh it costs O(parameters x shards) of Python,
        0.24 s at 723 tensors over 512 shards."""
        key = tuple(active)
        if key not in self._routes:
            routes = []
            for lay in self.layouts:
                owner = self.owners[lay.index]
                if not active[lay.index] or owner == SPREAD or owner // self.shards != self.replica:
                    continue
                others = (
                    [s for s in range(self.shards) if s != self.shard and self._rows_at(lay, s)[1]]
                    if owner == self.rank
                    else []
                )
                routes.append(
                    (lay.index, lay, owner % self.shards, self._rows_at(lay, self.shard)[1] > 0, others)
                )
            self._routes[key] = routes
        return self._routes[key]

    def _gather(self, grads: list, active: list[bool], crossing: int) -> None:
        """Every holder's rows of each active gradient to the parameter's owner, in its shard group."""
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
            self.move(outgoing, incoming, over=self.shard_group)

    def _scatter_updates(
        self, groups: list[dict], params: list[Tensor], updated: list[bool], crossing: int
    ) -> None:
        """Each holder gets the update of its rows from the owner (and from the other replicas), and
        applies it."""
        outgoing, incoming = self.new_runs(self.shards)
        updates: dict[int, Tensor] = {}  # parameter -> the update of this rank's rows, flat
        for i, lay, owner, mine, others in self._holders(updated):
            home = self.home_updates[i]
            if owner != self.shard:
                if mine:
                    updates[i] = torch.empty(params[i].numel(), dtype=home.dtype, device=home.device)
                    incoming[owner].append(updates[i])
                continue
            if mine:
                updates[i] = self._home_run(home, lay, self.shard)
            for d in others:
                outgoing[d].append(self._home_run(home, lay, d))
        if crossing:
            self.move(outgoing, incoming, self.update_dtypes, over=self.shard_group)
        for lay in self._spread_layouts:  # a spread parameter's update is of this rank's own rows
            i = lay.index
            if updated[i] and params[i].numel():
                own = self.home_updates[i].view(-1)
                if self.replicas > 1:  # its part of the shard's rows; the other replicas send the rest
                    updates[i] = own.new_empty(params[i].numel())
                    self._part(lay, updates[i], self.replica).copy_(own)
                else:
                    updates[i] = own
        if self.replicas > 1 and any(updated):
            self._share_across_replicas(params, updated, updates)
        apply_updates(groups, self.layouts, ((i, params[i].view(-1), u) for i, u in updates.items()))

    def _part(self, lay: ParamLayout, shard_rows: Tensor, replica: int) -> Tensor:
        """The elements of a flat run of this shard's rows that a replica steps (spread parameters)."""
        first, count = self._part_rows(lay, replica)
        width = lay.row_elements
        return shard_rows[first * width : (first + count) * width]

    def _share_across_replicas(
        self, params: list[Tensor], updated: list[bool], updates: dict[int, Tensor]
    ) -> None:
        """One all_to_all per dtype in the replicate group: each rank sends the ranks holding its shard
        in the other replicas the updates its replica made of those rows, and gets theirs."""
        outgoing, incoming = self.new_runs(self.replicas)
        others = [r for r in range(self.replicas) if r != self.replica]
        for lay in self.layouts:
            i = lay.index
            if not updated[i] or not params[i].numel():
                continue
            if self.spread[i]:
                for r in others:
                    outgoing[r].append(self._part(lay, updates[i], self.replica))
                    incoming[r].append(self._part(lay, updates[i], r))
                continue
            made_by = self.owners[i] // self.shards
            if made_by == self.replica:
                for r in others:
                    outgoing[r].append(updates[i])
            else:
                home = self.home_updates[i]
                updates[i] = torch.empty(params[i].numel(), dtype=home.dtype, device=home.device)
                incoming[made_by].append(updates[i])
        self.move(outgoing, incoming, self.update_dtypes, over=self.replica_group)

    # ----- checkpoints -----
    def _pieces(self, lay: ParamLayout, to_holders: bool) -> list[Piece]:
        """The runs of rows that travel between the ranks stepping a parameter and the ranks holding it
        in the mesh (DTensor shards), this rank at one end, in an order every rank derives alike.

        Saving (``to_holders``), every holder gets its rows from the rank(s) stepping them; loading,
        a stepping rank gets its rows from the holders in its own replica."""
        shards, me = self.shards, self.rank
        i = lay.index
        if self.spread[i]:  # only the ranks of this shard hold or step these rows
            same = [r * shards + self.shard for r in range(self.replicas)]
            pairs = [(a, b) for a in same for b in same if a == me or b == me] if to_holders else [(me, me)]
        else:
            owner = self.owners[i]
            first = owner - owner % shards  # the owner's replica
            team = range(self.ranks) if to_holders else range(first, first + shards)
            if owner == me:
                pairs = [(owner, t) for t in team]
            else:
                pairs = [(owner, me)] if me in team else []
        out = []
        for stepper, holder in pairs:
            a, n = self.stepped_rows(lay, stepper)
            c, m = held_rows(lay, shards, holder % shards)
            lo, hi = max(a, c), min(a + n, c + m)
            if lo < hi:
                out.append((stepper, holder, lo, hi))
        return out

    def _route_rows(
        self,
        lay: ParamLayout,
        to_holders: bool,
        source: tuple[Tensor, int],
        target: tuple[Tensor, int],
        outgoing: Runs,
        incoming: Runs,
    ) -> None:
        """Queue one row-indexed tensor's runs (``_pieces``): from this rank's ``source`` (a tensor and
        the parameter row it starts at) to the ranks receiving them, and into its ``target`` from
        the ranks sending them; a run it both sends and receives is copied here."""
        per_row = lay.block_rows_per_row
        (src, src_first), (dst, dst_first) = source, target
        for stepper, holder, lo, hi in self._pieces(lay, to_holders):
            sender, receiver = (stepper, holder) if to_holders else (holder, stepper)
            rows = there = None
            if sender == self.rank:
                rows = _rows(src, (lo - src_first) * per_row, (hi - src_first) * per_row)
            if receiver == self.rank:
                there = dst[(lo - dst_first) * per_row : (hi - dst_first) * per_row]
            if rows is not None and there is not None:
                there.copy_(rows)
            elif rows is not None:
                outgoing[receiver].append(rows.reshape(-1))
            else:
                incoming[sender].append(there.view(-1))

    def state_dict(self) -> dict[int, dict]:
        """The one-process state of every parameter; row-indexed tensors sharded like the parameters."""
        state = save_engine_state(self.engine, self.exchange)
        moves = list(self._row_keys(state))
        pieces: dict[tuple[int, str], Tensor] = {}
        outgoing, incoming = self.new_runs(self.ranks)
        for i, key in moves:
            lay, t = self.layouts[i], state[i][key]
            per_row = lay.block_rows_per_row
            first, count = held_rows(lay, self.shards, self.shard)
            mine = t.new_empty((count * per_row, *t.shape[1:]))
            pieces[(i, key)] = mine
            stepped = self.stepped_rows(lay, self.rank)[0]
            self._route_rows(lay, True, (t, stepped), (mine, first), outgoing, incoming)
        self.move(outgoing, incoming, _dtypes(state[i][k] for i, k in moves), over=self.scope)
        wrap = wrapper(self.mesh_placement)
        for (i, key), mine in pieces.items():
            lay = self.layouts[i]
            shape = (rows_of(lay) * lay.block_rows_per_row, *mine.shape[1:]) if lay.shape else mine.shape
            state[i][key] = wrap(mine, tuple(shape)) if wrap is not None else mine
        return state

    def load_state_dict(self, state: dict[Any, dict], partial: bool = False) -> None:
        """Row-indexed tensors (DTensors or full tensors) travel to the ranks that step their rows."""
        full: dict[int, dict] = {}
        moved: list[tuple[int, str]] = []
        outgoing, incoming = self.new_runs(self.ranks)
        for lay in self.layouts:
            i = lay.index
            entry = entry_of(state, i)
            if entry is None:
                continue
            row_keys = self._keys_of(lay, entry)
            out = {k: local(v) for k, v in entry.items() if k not in row_keys}
            per_row = lay.block_rows_per_row
            stepped, count = self.stepped_rows(lay, self.rank)
            for key in row_keys:
                value = entry[key]
                if not is_dtensor(value):  # a full tensor: this rank takes its rows, nothing moves
                    out[key] = _rows(value, stepped * per_row, (stepped + count) * per_row)
                    continue
                moved.append((i, key))
                part = local(value)
                whole = part.new_zeros((count * per_row, *part.shape[1:]))
                out[key] = whole
                held = held_rows(lay, self.shards, self.shard)[0]
                self._route_rows(lay, False, (part, held), (whole, stepped), outgoing, incoming)
            full[i] = out
        dtypes = _dtypes(local(entry_of(state, i)[k]) for i, k in moved)
        self.move(outgoing, incoming, dtypes, over=self.scope)
        load_engine_state(self.engine, full, partial=partial)

    @staticmethod
    def _keys_of(lay: ParamLayout, entry: dict) -> list[str]:
        keys = [k for k in ROW_KEYS if k in entry]
        if lay.preconditioned[0]:
            keys += sorted(k for k in entry if k.endswith("_0"))
        return keys

    def _row_keys(self, state: dict[int, dict]) -> list[tuple[int, str]]:
        return [(lay.index, k) for lay in self.layouts for k in self._keys_of(lay, state[lay.index])]


def _rows(t: Tensor, start: int, end: int) -> Tensor:
    """Rows [start, end) of a full tensor; a scalar parameter's state is whole at its one row."""
    if t.dim() == 0:
        return t if end > start else t.new_empty((0,))
    return t[start:end]


def _dtypes(tensors) -> list[torch.dtype]:
    return sorted({t.dtype for t in tensors}, key=str)
