"""Per-parameter state dicts from the engine's stacked storage, and back.

torch.optim and DCP expect ``state[param_index][key] -> tensor``. The engine keeps moments stacked
by block shape and factors stacked by size, so saving gathers each parameter's pieces and loading
scatters them back (copies, off the hot path). Every key exists from the first step on.

Per parameter, in block space (after permute/merge; see docs/algorithm.md):
- ``step`` (float tensor, as torch.optim), ``initialized`` (1.0 after the first call);
- ``exp_avg`` (rotated basis) and ``exp_avg_sq``, shape = block space shape;
- ``factor_j`` / ``basis_j`` per preconditioned dim j: ``[d_j, d_j]`` for j >= 1; for j = 0 the row
  blocks' factors side by side, ``[d_0, width]``, block r in rows [r0, r0 + n_r) and columns [0, n_r);
- with refresh_delay >= 1: ``pending_basis_j``, ``pending_perm_j`` (rows for j = 0), ``pending_ok_j``
  (shaped like the perm: a block's flag on each of its rows for j = 0, ``[d_j]`` copies of the one
  flag for j >= 1) and ``install_step`` (-1 when nothing waits).

Across ranks (docs/design.md, "Checkpoints"): moments, and row factors under fsdp-local, are the
rank's rows of a global tensor (``wrap`` makes them DTensors); everything else is the full tensor,
identical on every rank, assembled by one all-reduce of the owners' values. Saving also
consolidates each shared factor's partial statistics at its owner (the sum is unchanged), so a
loaded optimizer continues exactly as the saving one does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from .engine import SoapEngine
from .layout import ParamLayout
from .placements.tensors import is_dtensor, local
from .plan import FactorEntry
from .state_check import OTHER_ROW_BLOCKS, check_engine_state, entry_of, required_keys
from .stores import FactorStore, moment_dtype

Tensor = torch.Tensor
Wrap = Callable[[Tensor, tuple[int, ...]], Tensor]  # local rows -> a tensor of the given global shape


def _locations(engine: SoapEngine) -> dict[int, list[tuple[int, Any, int]]]:
    """param -> [(row block, stack, position in stack)] sorted by row block."""
    where: dict[int, list[tuple[int, Any, int]]] = {}
    for stack in engine.stacks:
        for pos, (lay, b) in enumerate(stack.members):
            where.setdefault(lay.index, []).append((b, stack, pos))
    for pieces in where.values():
        pieces.sort(key=lambda item: item[0])
    return where


def _entries(engine: SoapEngine) -> dict[tuple[int, int], list[tuple[FactorEntry, FactorStore, int]]]:
    """(param, dim) -> the plan entries this rank holds a slot for, with their slots."""
    out: dict[tuple[int, int], list[tuple[FactorEntry, FactorStore, int]]] = defaultdict(list)
    for e, (store, slot) in engine.entry_slot.items():
        out[(e.param, e.dim)].append((e, store, slot))
    for items in out.values():
        items.sort(key=lambda item: (item[0].shard, item[0].block))
    return out


def _rows_sharded(engine: SoapEngine) -> bool:
    """fsdp-local: row factors stay with their shard (a DTensor), never assembled on one rank."""
    topo = engine.plan.topology
    return topo.replicas == 1 and topo.shards > 1


def _local_start(engine: SoapEngine, e: FactorEntry) -> int:
    return engine.layouts[e.param].row_offsets[e.block]


class _Box:
    """Where one entry sits in a per-parameter tensor: rows [start, start + n), columns [0, n)."""

    def __init__(self, engine: SoapEngine, e: FactorEntry, sharded_rows: bool) -> None:
        self.whole = e.shared
        self.start = (
            0 if e.shared else (_local_start(engine, e) if sharded_rows else engine.plan.row_start(e))
        )
        self.n = e.size

    def view(self, t: Tensor) -> Tensor:
        return t if self.whole else t[self.start : self.start + self.n, : self.n]

    def rows(self, t: Tensor) -> Tensor:
        return t if self.whole else t[self.start : self.start + self.n]


def save_engine_state(engine: SoapEngine, exchange: Any = None, wrap: Wrap | None = None) -> dict[int, dict]:
    engine.complete_inflight()
    plan, me = engine.plan, engine.plan.topology.rank
    sharded_rows = _rows_sharded(engine)
    where, held = _locations(engine), _entries(engine)
    delay = engine.refresh_delay
    summed: list[Tensor] = []  # full tensors every rank fills with what it owns, then all-reduced
    state: dict[int, dict] = {}
    for lay in engine.layouts:
        i, full = lay.index, plan.layouts[lay.index]
        entry: dict[str, Tensor] = {
            "step": torch.tensor(float(engine.steps[i]), dtype=torch.float64),  # exact past 2**24
            "initialized": torch.tensor(1.0 if engine.started[i] else 0.0),
        }
        phase = engine.phases[i] if engine.phases is not None else engine.loaded_phases.get(i)
        if engine.refresh_schedule == "staggered" and phase is not None:  # loaded, no step since
            entry["refresh_phase"] = torch.tensor(float(phase), dtype=torch.float64)
        moments = _moments(engine, lay, where.get(i, []))
        for key, mine in zip(("exp_avg", "exp_avg_sq"), moments, strict=True):
            entry[key] = wrap(mine, full.block_shape) if wrap is not None and _sharded(engine) else mine
        for j, pre in enumerate(lay.preconditioned):
            if not pre:
                continue
            items = held.get((i, j), [])
            local_form = j == 0 and sharded_rows
            if j == 0:
                rows = lay.block_shape[0] if local_form else full.block_shape[0]
                shapes = {"m": (rows, plan.row_width(i)), "v": (rows,)}
            else:
                d = lay.block_shape[j]
                shapes = {"m": (d, d), "v": (d,)}
            keys = {f"factor_{j}": "m", f"basis_{j}": "m"}
            if delay:
                keys |= {f"pending_basis_{j}": "m", f"pending_perm_{j}": "v", f"pending_ok_{j}": "v"}
            made = {
                k: torch.zeros(shapes[kind], dtype=engine.factor_dtype, device=engine.device)
                for k, kind in keys.items()
            }
            for e, store, slot in items:
                box = _Box(engine, e, local_form)
                stat = store.stat_rows[slot]
                if stat >= 0:  # partials of a shared factor sum to the whole; a row factor has one keeper
                    box.view(made[f"factor_{j}"]).copy_(store.factors[stat])
                if local_form or e.owner == me:
                    box.view(made[f"basis_{j}"]).copy_(store.bases[slot])
                    if delay:
                        pend = engine.pending_for(store)
                        box.view(made[f"pending_basis_{j}"]).copy_(pend.bases[slot])
                        box.rows(made[f"pending_perm_{j}"]).copy_(pend.perm[slot].to(engine.factor_dtype))
                        box.rows(made[f"pending_ok_{j}"]).fill_(float(pend.ok[slot]))
            for k, t in made.items():
                if local_form:
                    entry[k] = wrap(t, (full.block_shape[0], *t.shape[1:])) if wrap is not None else t
                else:
                    summed.append(t)
                    entry[k] = t
        if delay:
            entry["install_step"] = torch.tensor(float(engine.install_step.get(i, -1)), dtype=torch.float64)
        state[i] = entry
    if exchange is not None and summed:
        flat = exchange.all_reduce_sum(torch.cat([t.reshape(-1) for t in summed]))
        at = 0
        for t in summed:
            t.copy_(flat[at : at + t.numel()].view_as(t))
            at += t.numel()
        _consolidate(engine, state)
    for entry in state.values():
        for k in list(entry):
            if k.startswith("pending_perm_") and not is_dtensor(entry[k]):
                entry[k] = entry[k].round().long()
    return state


def _sharded(engine: SoapEngine) -> bool:
    return engine.plan.topology.shards > 1


def _moments(engine: SoapEngine, lay: ParamLayout, pieces: list) -> tuple[Tensor, Tensor]:
    if pieces:
        return (
            torch.cat([s.exp_avg[pos] for _, s, pos in pieces]).clone(),
            torch.cat([s.exp_avg_sq[pos] for _, s, pos in pieces]).clone(),
        )
    dtype = moment_dtype(engine.param_dtypes[lay.index])
    empty = torch.zeros(lay.block_shape, dtype=dtype, device=engine.device)
    return empty, empty.clone()


def _consolidate(engine: SoapEngine, state: dict[int, dict]) -> None:
    """A shared factor's statistic moves whole to its owner; the other ranks' partials restart at 0."""
    plan, me = engine.plan, engine.plan.topology.rank
    for e, (store, slot) in engine.entry_slot.items():
        row = store.stat_rows[slot]
        if row < 0 or not plan.needs_reduce(e):
            continue
        if plan.keeper(e) == me:
            store.factors[row].copy_(state[e.param][f"factor_{e.dim}"])
        else:
            store.factors[row].zero_()


def with_row_flags(engine: SoapEngine, state: dict[Any, dict[str, Tensor]]) -> dict[Any, dict[str, Tensor]]:
    """``state`` with ``pending_ok_j`` in today's layout (a flag on each row) where it was saved in the
    layout of soap_dist before its placements (9345cdf, one process): one flag per row block for
    j = 0, one flag for j >= 1. Only where the state holds whole parameters' rows (not fsdp-local,
    owner or ZeRO over several ranks, whose rank-local rows could have as many values as the blocks);
    there ``_check_blocks_fit`` refuses the old layout, naming the key. ``state`` is not changed."""
    if _rows_sharded(engine):
        return state
    upgraded = dict(state)
    for lay in engine.layouts:
        key = lay.index if lay.index in state else str(lay.index)
        entry = state.get(key)
        if not isinstance(entry, dict):
            continue
        full = engine.plan.layouts[lay.index]
        for j in range(len(full.block_shape)):
            ok = entry.get(f"pending_ok_{j}")
            if not isinstance(ok, Tensor) or is_dtensor(ok) or ok.dim() != 1:
                continue
            counts = list(full.row_counts) if j == 0 else [full.block_shape[j]]
            if ok.numel() == len(counts) != sum(counts):
                rows = torch.repeat_interleave(ok, torch.tensor(counts, device=ok.device))
                upgraded[key] = entry = {**entry, f"pending_ok_{j}": rows}
    return upgraded


def check_loadable(engine: SoapEngine, state: dict[Any, dict[str, Tensor]], partial: bool = False) -> None:
    """Raise ValueError if ``state`` is corrupt or does not fit the engine; nothing is copied."""
    _check_upgraded(engine, with_row_flags(engine, state), partial)


def _check_upgraded(engine: SoapEngine, state: dict[Any, dict[str, Tensor]], partial: bool) -> None:
    check_engine_state(engine, state)
    _check_fits(engine, state, _locations(engine), partial)
    _check_blocks_fit(engine, state)


def _check_blocks_fit(engine: SoapEngine, state: dict[Any, dict[str, Tensor]]) -> None:
    """Every factor and basis block this rank copies has the shape of its slot (and a pending basis
    comes with its permutation and flags), so that the copy cannot fail halfway."""
    sharded_rows = _rows_sharded(engine)
    for (i, j), items in _entries(engine).items():
        entry = entry_of(state, i)
        if entry is None:
            continue
        name = engine.layouts[i].name
        squares = [f"factor_{j}", f"basis_{j}"]  # present: _check_fits ran
        flags: list[str] = []  # one value per row of the block
        if engine.refresh_delay and f"pending_basis_{j}" in entry:
            squares.append(f"pending_basis_{j}")
            flags = [f"pending_perm_{j}", f"pending_ok_{j}"]
            lacking = [k for k in flags if k not in entry]
            if lacking:
                raise ValueError(f"SOAP.load_state_dict: the state of {name} has no {', '.join(lacking)}")
        for e, store, slot in items:
            box, slot_shape = _Box(engine, e, j == 0 and sharded_rows), tuple(store.bases[slot].shape)
            for key in flags:
                got = tuple(box.rows(local(entry[key]).reshape(-1)).shape)
                if got != slot_shape[:1]:
                    raise ValueError(
                        f"SOAP.load_state_dict: {key} of {name} covers {got[0]} of the {slot_shape[0]} rows "
                        "of a block: the state was saved for another model or other options"
                        + (
                            " (or by a soap_dist older than its placements: load it in one process and "
                            "save it again)"
                            if key.startswith("pending_ok")
                            else ""
                        )
                    )
            for key in squares:
                got = tuple(box.view(local(entry[key])).shape)
                if got != slot_shape:
                    why = (
                        OTHER_ROW_BLOCKS
                        if j == 0
                        else "the state was saved for another model or other options"
                    )
                    raise ValueError(
                        f"SOAP.load_state_dict: {key} of {name} holds a block of shape {got} where this "
                        f"optimizer's is {slot_shape}: {why}"
                    )


def load_engine_state(
    engine: SoapEngine, state: dict[Any, dict[str, Tensor]], partial: bool = False, checked: bool = False
) -> None:
    """Copy saved per-parameter state into the engine; ``partial`` allows parameters the state lacks.
    A state that ``check_loadable`` refuses fails before anything is copied (``checked``: it ran)."""
    state = with_row_flags(engine, state)
    if not checked:
        _check_upgraded(engine, state, partial)
    where, held = _locations(engine), _entries(engine)
    engine.complete_inflight()  # nothing launched or in flight may land on top of the loaded state
    plan, me = engine.plan, engine.plan.topology.rank
    sharded_rows = _rows_sharded(engine)
    for lay in engine.layouts:
        entry = entry_of(state, lay.index)
        if entry is None:
            continue
        engine.steps[lay.index] = int(_number(entry["step"]))
        engine.started[lay.index] = _number(entry.get("initialized", entry["step"])) > 0
        if engine.refresh_schedule == "staggered" and "refresh_phase" in entry:
            engine.loaded_phases[lay.index] = int(_number(entry["refresh_phase"]))
        pieces = where.get(lay.index, [])
        if pieces:
            exp_avg, exp_avg_sq = local(entry["exp_avg"]), local(entry["exp_avg_sq"])
            offsets = lay.row_offsets
            for b, stack, pos in pieces:
                rows = slice(offsets[b], offsets[b] + lay.row_counts[b])
                stack.exp_avg[pos].copy_(exp_avg[rows])
                stack.exp_avg_sq[pos].copy_(exp_avg_sq[rows])
        for j, pre in enumerate(lay.preconditioned):
            if not pre:
                continue
            local_form = j == 0 and sharded_rows
            factor, basis = local(entry[f"factor_{j}"]), local(entry[f"basis_{j}"])
            pending = engine.refresh_delay and f"pending_basis_{j}" in entry
            for e, store, slot in held.get((lay.index, j), []):
                box = _Box(engine, e, local_form)
                store.bases[slot].copy_(box.view(basis))
                row = store.stat_rows[slot]
                if row >= 0:
                    whole = local_form or not plan.needs_reduce(e) or plan.keeper(e) == me
                    store.factors[row].copy_(
                        box.view(factor) if whole else torch.zeros_like(store.factors[row])
                    )
                if pending:
                    pend = engine.pending_for(store)
                    pend.bases[slot].copy_(box.view(local(entry[f"pending_basis_{j}"])))
                    pend.perm[slot].copy_(box.rows(local(entry[f"pending_perm_{j}"])).round().long())
                    ok_rows = box.rows(local(entry[f"pending_ok_{j}"]).reshape(-1))
                    pend.ok[slot] = bool(ok_rows[0] > 0.5)
        if engine.refresh_delay and "install_step" in entry:
            step = int(_number(entry["install_step"]))
            if step >= 0:
                engine.install_step[lay.index] = step
            else:
                engine.install_step.pop(lay.index, None)
    engine.apply_loaded_phases()


def _check_fits(engine: SoapEngine, state: dict[Any, dict[str, Tensor]], where: dict, partial: bool) -> None:
    """Refuse, before anything is copied, a state that lacks an entry or a key, holds moments of other
    shapes, or a basis waiting for an install step this optimizer (refresh_delay=0) will not have."""
    if not partial and len(state) != len(engine.layouts):
        raise ValueError(
            f"SOAP.load_state_dict: the state holds {len(state)} parameters, "
            f"this optimizer {len(engine.layouts)}"
        )
    for lay in engine.layouts:
        entry = entry_of(state, lay.index)
        if entry is None:
            if partial:
                continue
            raise ValueError(f"SOAP.load_state_dict: no saved state for parameter {lay.index} ({lay.name})")
        lacking = [k for k in required_keys(lay.preconditioned) if k not in entry]
        if lacking:
            raise ValueError(f"SOAP.load_state_dict: the state of {lay.name} has no {', '.join(lacking)}")
        if not engine.refresh_delay and "install_step" in entry and _number(entry["install_step"]) >= 0:
            raise ValueError(
                f"SOAP.load_state_dict: the state of {lay.name} holds a refreshed basis waiting for its "
                "install step (saved with refresh_delay >= 1); load it into an optimizer with the same "
                "refresh_delay"
            )
        if where.get(lay.index):
            for key in ("exp_avg", "exp_avg_sq"):
                _expect(local(entry[key]), lay.block_shape, lay, key)


def _number(value: Any) -> float:
    """A saved scalar: a tensor (torch.optim's layout) or a plain Python number (older checkpoints)."""
    return float(local(value).item()) if torch.is_tensor(value) else float(value)


def _expect(tensor: Tensor, shape: tuple[int, ...], lay: ParamLayout, key: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"SOAP.load_state_dict: {key} of {lay.name} has shape {tuple(tensor.shape)}, "
            f"expected {tuple(shape)}"
        )
