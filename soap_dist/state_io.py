"""Per-parameter state dicts from the engine's stacked storage, and back.

torch.optim and DCP expect ``state[param_index][key] -> tensor``. The engine keeps moments stacked
by block shape and factors stacked by size, so saving gathers each parameter's pieces and loading
scatters them back (copies, off the hot path). Every key exists from the first step on.

Per parameter, in block space (after permute/merge; see docs/algorithm.md):
- ``step`` (float tensor, as torch.optim), ``initialized`` (1.0 after the first call);
- ``exp_avg`` (rotated basis) and ``exp_avg_sq``, shape = block space shape;
- ``factor_j`` / ``basis_j`` per preconditioned dim j: ``[d_j, d_j]`` for j >= 1; for j = 0 the row
  blocks' factors side by side, ``[d_0, width]``, block r in rows [r0, r0 + n_r) and columns [0, n_r);
- with refresh_delay >= 1: ``pending_basis_j``, ``pending_perm_j``, ``pending_ok_j`` and
  ``install_step`` (-1 when nothing waits).
"""

from __future__ import annotations

from typing import Any

import torch

from .engine import SoapEngine
from .layout import ParamLayout
from .stores import FactorStore

Tensor = torch.Tensor


def _locations(engine: SoapEngine) -> dict[int, list[tuple[int, Any, int]]]:
    """param -> [(row block, stack, position in stack)] sorted by row block."""
    where: dict[int, list[tuple[int, Any, int]]] = {}
    for stack in engine.stacks:
        for pos, (lay, b) in enumerate(stack.members):
            where.setdefault(lay.index, []).append((b, stack, pos))
    for pieces in where.values():
        pieces.sort(key=lambda item: item[0])
    return where


def _factor_slots(engine: SoapEngine, lay: ParamLayout, dim: int) -> list[tuple[FactorStore, int]]:
    if dim == 0:
        return [engine.row_slots[(lay.index, b)] for b in range(len(lay.row_counts))]
    return [engine.shared_slots[(lay.index, dim)]]


def save_engine_state(engine: SoapEngine) -> dict[int, dict[str, Tensor]]:
    state: dict[int, dict[str, Tensor]] = {}
    where = _locations(engine)
    for lay in engine.layouts:
        i = lay.index
        entry = {
            "step": torch.tensor(float(engine.steps[i])),
            "initialized": torch.tensor(1.0 if engine.started[i] else 0.0),
        }
        pieces = where.get(i, [])
        if pieces:
            entry["exp_avg"] = torch.cat([s.exp_avg[pos] for _, s, pos in pieces]).clone()
            entry["exp_avg_sq"] = torch.cat([s.exp_avg_sq[pos] for _, s, pos in pieces]).clone()
        for j, pre in enumerate(lay.preconditioned):
            if not pre:
                continue
            slots = _factor_slots(engine, lay, j)
            entry[f"factor_{j}"] = _gather(lay, j, [st.factors[k] for st, k in slots])
            entry[f"basis_{j}"] = _gather(lay, j, [st.bases[k] for st, k in slots])
            if engine.refresh_delay:
                pend = [(engine.pending_for(st), k) for st, k in slots]
                entry[f"pending_basis_{j}"] = _gather(lay, j, [p.bases[k] for p, k in pend])
                entry[f"pending_perm_{j}"] = torch.cat([p.perm[k] for p, k in pend]).clone()
                entry[f"pending_ok_{j}"] = torch.stack([p.ok[k] for p, k in pend]).to(torch.float32)
        if engine.refresh_delay:
            entry["install_step"] = torch.tensor(float(engine.install_step.get(i, -1)))
        state[i] = entry
    return state


def _gather(lay: ParamLayout, dim: int, mats: list[Tensor]) -> Tensor:
    if dim != 0:
        return mats[0].clone()
    out = mats[0].new_zeros(lay.block_shape[0], lay.row_factor_width)
    for start, rows, mat in zip(lay.row_offsets, lay.row_counts, mats, strict=True):
        out[start : start + rows, :rows] = mat
    return out


def _scatter(lay: ParamLayout, dim: int, saved: Tensor) -> list[Tensor]:
    if dim != 0:
        return [saved]
    return [
        saved[start : start + rows, :rows]
        for start, rows in zip(lay.row_offsets, lay.row_counts, strict=True)
    ]


def load_engine_state(engine: SoapEngine, state: dict[Any, dict[str, Tensor]], partial: bool = False) -> None:
    """Copy saved per-parameter state into the engine; ``partial`` allows parameters the state lacks."""
    where = _locations(engine)
    if not partial and len(state) != len(engine.layouts):
        raise ValueError(
            f"SOAP.load_state_dict: the state holds {len(state)} parameters, "
            f"this optimizer {len(engine.layouts)}"
        )
    for lay in engine.layouts:
        entry = state.get(lay.index, state.get(str(lay.index)))
        if entry is None:
            if partial:
                continue
            raise ValueError(f"SOAP.load_state_dict: no saved state for parameter {lay.index} ({lay.name})")
        engine.steps[lay.index] = int(entry["step"].item())
        engine.started[lay.index] = bool(entry.get("initialized", entry["step"]).item() > 0)
        pieces = where.get(lay.index, [])
        if pieces:
            _expect(entry["exp_avg"], lay.block_shape, lay, "exp_avg")
            offsets = lay.row_offsets
            for b, stack, pos in pieces:
                rows = slice(offsets[b], offsets[b] + lay.row_counts[b])
                stack.exp_avg[pos].copy_(entry["exp_avg"][rows])
                stack.exp_avg_sq[pos].copy_(entry["exp_avg_sq"][rows])
        for j, pre in enumerate(lay.preconditioned):
            if not pre:
                continue
            slots = _factor_slots(engine, lay, j)
            for (store, k), f, q in zip(
                slots,
                _scatter(lay, j, entry[f"factor_{j}"]),
                _scatter(lay, j, entry[f"basis_{j}"]),
                strict=True,
            ):
                store.factors[k].copy_(f)
                store.bases[k].copy_(q)
            if engine.refresh_delay and f"pending_basis_{j}" in entry:
                offsets = (
                    [0, *torch.tensor(lay.row_counts).cumsum(0).tolist()]
                    if j == 0
                    else [0, lay.block_shape[j]]
                )
                bases = _scatter(lay, j, entry[f"pending_basis_{j}"])
                for n, (store, k) in enumerate(slots):
                    pend = engine.pending_for(store)
                    pend.bases[k].copy_(bases[n])
                    pend.perm[k].copy_(entry[f"pending_perm_{j}"][offsets[n] : offsets[n + 1]])
                    pend.ok[k] = bool(entry[f"pending_ok_{j}"][n] > 0)
        if engine.refresh_delay and "install_step" in entry:
            step = int(entry["install_step"].item())
            if step >= 0:
                engine.install_step[lay.index] = step
            else:
                engine.install_step.pop(lay.index, None)


def _expect(tensor: Tensor, shape: tuple[int, ...], lay: ParamLayout, key: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"SOAP.load_state_dict: {key} of {lay.name} has shape {tuple(tensor.shape)}, "
            f"expected {tuple(shape)}"
        )
