"""SOAP on DeepSpeed ZeRO's flat partitions (placement "zero", or "owner" when asked for).

DeepSpeed stages 1-3 call the client optimizer once per flat partition (a param group under
stages 1/2, a sub-group under stage 3), with that flat slice as its only parameter. This runner
turns each call into a SOAP step on whole row blocks: the gradients of pieces of the slice travel
to the rank that updates them (``zero_layout``), the engine steps the home rows like any shard, and
each piece's update travels back to be applied to the slice holding it (values never travel).
Which rank updates what is decided from shapes and offsets alone (docs/design.md, section 8), so
the result equals one process with the same ``block_size`` at every world size and every partition
boundary. With ``"placement": "owner"`` in the JSON's SOAP params, each whole parameter's rows go
to one owner instead (``owner_layout``): the result equals one process whatever ``block_size``,
and each rank keeps 1/W of the state, column factors included.

What DeepSpeed exposes is read in ``soap_dist.integrations.deepspeed_zero`` and arrives here as a
``Partitioning``; nothing here imports deepspeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..comm import Groups
from ..layout import ParamLayout, plan_in_group
from ..owner_layout import assign_owners, owner_splits, spread_params
from ..plan import OWNER, ZERO, Topology, build_plan, local_layouts
from ..state_io import load_engine_state, save_engine_state
from ..stores import moment_dtype
from ..zero_layout import Fragment, homes, routes, unit_rows
from .rows import HomeRowsRunner, apply_updates

Tensor = torch.Tensor


@dataclass
class Partitioning:
    """What a ZeRO optimizer holds, in plain terms: every parameter and every rank's slice of it."""

    world: int
    rank: int
    process_group: Any
    ranks: list[int]  # global rank of each data-parallel rank
    flats: list[Tensor]  # this rank's flat fp32 slices, in DeepSpeed's order
    flat_group: list[int]  # the param group of each flat slice
    shapes: list[tuple[int, ...]]  # every parameter's real shape (ds_shape under zero.Init)
    names: list[str]
    param_flat: list[int]  # parameter -> its flat slice
    fragments: list[list[Fragment]]  # rank -> the fragments of its slices, one per parameter at most


class ZeroRunner(HomeRowsRunner):
    """The engine, the plan and the home buffers of one SOAP optimizer under ZeRO stages 1-3."""

    def __init__(self, soap: Any, part: Partitioning, groups: list[dict]) -> None:
        self.part = part
        self.world = part.world
        self.groups = groups
        self.layouts = [
            self._layout(i, groups[part.flat_group[part.param_flat[i]]]) for i in range(len(part.shapes))
        ]
        held = self._held()
        normalized = [bool(groups[lay.group]["normalize_grads"]) for lay in self.layouts]

        def zero_rows(lay: ParamLayout) -> list[tuple[int, int]]:
            """Placement zero's rows: whole units, each at the rank holding most of it."""
            return homes(lay, unit_rows(lay, normalized[lay.index]), held[lay.index])

        self.spread = [False] * len(self.layouts)
        if soap.placement == OWNER:  # each whole matrix at one rank: exact, state 1/W (docs/design.md, 9)
            factor_bytes = torch.empty((), dtype=soap.factor_dtype).element_size()
            four = [4] * len(self.layouts)
            spread = spread_params(self.layouts, part.world, factor_bytes, four, normalized)
            owners = assign_owners(self.layouts, part.world, factor_bytes, four, spread)
            # a spread parameter (no row factor, too large for one owner) keeps zero's rows instead
            self.splits = {
                i: zero_rows(self.layouts[i]) if i in spread else rows
                for i, rows in owner_splits(self.layouts, owners, part.world).items()
            }
            self.spread = [lay.index in spread for lay in self.layouts]
        else:
            self.splits = {lay.index: zero_rows(lay) for lay in self.layouts}
        self.placement_name = OWNER if soap.placement == OWNER else ZERO  # checkpoints record it
        topology = Topology(self.placement_name, 1, part.world, part.rank)
        plan = build_plan(self.layouts, topology, self.splits)
        device = part.flats[0].device if part.flats else torch.device("cpu")
        grid = Groups(world=part.process_group, shard=part.process_group, replicate=None, ranks=part.ranks)
        self.exchange = soap._new_exchange(plan, grid, device)
        soap._check_plan(self.exchange, self.layouts, groups)
        dtype = part.flats[0].dtype if part.flats else torch.float32
        # A parameter whose home rows all lie in this rank's own slice is stepped in place, on a view
        # of the slice. For the others, the pieces' gradients come to the home buffers, and the engine
        # writes their update (in the step's compute dtype) for the ranks holding the rows to apply:
        # values never travel.
        self.in_place = self._in_place()
        self.update_dtype = torch.promote_types(moment_dtype(dtype), soap.factor_dtype)
        away = [lay.index not in self.in_place for lay in self.layouts]
        self.home_grads = [
            self._home(lay, dtype, device) if away[lay.index] else None for lay in self.layouts
        ]
        self.home_updates = [
            self._home(lay, self.update_dtype, device) if away[lay.index] else torch.empty(0, device=device)
            for lay in self.layouts
        ]
        dtypes_only = [torch.empty(0, dtype=dtype, device=device) for _ in self.layouts]  # what it reads
        mine = local_layouts(self.layouts, topology, self.splits)
        self.engine = soap._new_engine(mine, dtypes_only, plan, self.exchange, writes_updates=away)
        self.flat_index = {id(t): f for f, t in enumerate(part.flats)}
        self.flat_params = [
            [i for i, f in enumerate(part.param_flat) if f == k] for k in range(len(part.flats))
        ]
        self.routes = [
            routes(self.layouts, params, part.fragments, self.splits, part.rank)
            for params in self.flat_params
        ]

    # ----- construction -----
    def _layout(self, index: int, group: dict) -> ParamLayout:
        shape = self.part.shapes[index] or (1,)  # a scalar is one row
        group_index = self.part.flat_group[self.part.param_flat[index]]
        return plan_in_group(index, group_index, self.part.names[index], shape, group)

    def _held(self) -> list[list[tuple[int, int]]]:
        """param -> rank -> (start, numel) of the flattened parameter that rank's slice holds."""
        held = [[(0, 0)] * self.part.world for _ in self.layouts]
        for r, frags in enumerate(self.part.fragments):
            for frag in frags:
                held[frag.param][r] = (frag.start, frag.numel)
        return held

    def _in_place(self) -> dict[int, int]:
        """param -> offset in this rank's slice of its home rows, when they lie entirely in the slice."""
        out = {}
        me = self.part.rank
        for frag in self.part.fragments[me]:
            first, count = self.splits[frag.param][me]
            lay = self.layouts[frag.param]
            width = lay.row_elements
            lo, hi = first * width, (first + count) * width
            if count and frag.start <= lo and hi <= frag.start + frag.numel:
                out[frag.param] = frag.offset + lo - frag.start
        return out

    def _view(self, param: int, flat: Tensor) -> Tensor:
        lay = self.layouts[param]
        count = self.splits[param][self.part.rank][1]
        width = lay.row_elements
        return flat.narrow(0, self.in_place[param], count * width).view(count, *lay.shape[1:])

    def _home(self, lay: ParamLayout, dtype: torch.dtype, device: torch.device) -> Tensor:
        count = self.splits[lay.index][self.part.rank][1]
        return torch.zeros((count, *lay.shape[1:]), dtype=dtype, device=device)

    # ----- the step -----
    def flats_in(self, param_groups: list[dict]) -> list[int]:
        """The flat slices DeepSpeed hands over in this call, with the live group of each."""
        found = []
        for group in param_groups:
            for p in group["params"]:
                f = self.flat_index.get(id(p))
                if f is None:
                    raise RuntimeError(
                        "SOAP under DeepSpeed ZeRO: got a parameter that is none of the ZeRO optimizer's "
                        f"flat partitions (shape {tuple(p.shape)}); the optimizer was rebuilt or re-bound"
                    )
                self.groups[self.part.flat_group[f]] = group
                found.append(f)
        return found

    @torch.no_grad()
    def step(self, flat: int) -> None:
        """One SOAP step of every parameter in one flat slice."""
        slice_ = self.part.flats[flat]
        grad = slice_.grad
        if grad is None:
            return
        values, grad = slice_.detach().reshape(-1), grad.reshape(-1)
        self._gather(flat, grad)
        active = [False] * len(self.layouts)
        grads: list[Tensor | None] = [None] * len(self.layouts)
        params = list(self.home_updates)
        for i in self.flat_params[flat]:
            active[i] = True
            if i in self.in_place:  # fresh views: DeepSpeed hands over a new gradient every step
                params[i], grads[i] = self._view(i, values), self._view(i, grad)
            else:
                grads[i] = self.home_grads[i]
        # A parameter's first step only starts its statistics: the engine writes no update for it.
        updated = {i for i in self.flat_params[flat] if self.engine.started[i]}
        self.engine.step(self.groups, params, grads, active)
        self._scatter(flat, values, updated)

    def _gather(self, flat: int, grad: Tensor) -> None:
        """Every piece's gradient to its home (this rank's own pieces by a local copy)."""
        route, crossing = self.routes[flat]
        me = self.part.rank
        for p in route.send[me]:
            if p.param not in self.in_place:
                self._home_run(p.param, self.home_grads, p).copy_(
                    grad[p.flat_offset : p.flat_offset + p.numel]
                )
        if not crossing:  # nothing crosses ranks anywhere in the job: every rank skips alike
            return
        outgoing, incoming = self.new_runs(self.world)
        for d, pieces in enumerate(route.send):
            if d != me:
                outgoing[d] += [grad[p.flat_offset : p.flat_offset + p.numel] for p in pieces]
        for s, pieces in enumerate(route.recv):
            if s != me:
                incoming[s] += [self._home_run(p.param, self.home_grads, p) for p in pieces]
        self.move(outgoing, incoming, [grad.dtype])

    def _scatter(self, flat: int, values: Tensor, updated: set[int]) -> None:
        """Every piece's update from its home, applied to this rank's slice with the one-process rule."""
        route, crossing = self.routes[flat]
        me = self.part.rank
        pieces_here: list[tuple[int, Tensor, Tensor]] = []  # (param, values piece, its update)
        for p in route.send[me]:
            if p.param not in self.in_place and p.param in updated:
                update = self._home_run(p.param, self.home_updates, p)
                pieces_here.append((p.param, values[p.flat_offset : p.flat_offset + p.numel], update))
        if crossing:
            outgoing, incoming = self.new_runs(self.world)
            for s, pieces in enumerate(route.recv):
                if s != me:
                    outgoing[s] += [
                        self._home_run(p.param, self.home_updates, p) for p in pieces if p.param in updated
                    ]
            for d, pieces in enumerate(route.send):
                if d == me:
                    continue
                for p in pieces:
                    if p.param in updated:
                        update = torch.empty(p.numel, dtype=self.update_dtype, device=values.device)
                        incoming[d].append(update)
                        pieces_here.append((p.param, values[p.flat_offset : p.flat_offset + p.numel], update))
            self.move(outgoing, incoming, [self.update_dtype])
        apply_updates(self.groups, self.layouts, pieces_here)

    @staticmethod
    def _home_run(param: int, buffers: list[Tensor], p: Any) -> Tensor:
        return buffers[param].view(-1)[p.home_offset : p.home_offset + p.numel]

    # ----- checkpoints (each rank saves and loads its own file, as DeepSpeed does) -----
    def state_dict(self) -> dict[int, dict]:
        return save_engine_state(self.engine, self.exchange)

    def load_state_dict(self, state: dict[Any, dict], checked: bool = False) -> None:
        load_engine_state(self.engine, state, checked=checked)

    def param_counts(self) -> list[int]:
        """Parameters per param group, in plan order (for the saved param_groups)."""
        counts = [0] * (max(self.part.flat_group, default=-1) + 1)
        for lay in self.layouts:
            counts[lay.group] += 1
        return counts
