"""Placement "owner", as pure functions of shapes: who owns each parameter, and what moves each step.

Every parameter has one owner inside a shard group. The owner holds the whole matrix's SOAP state
(statistics, bases, moments) and runs the one-process step on it; the other shards only hold their
rows of the parameter. Owners are chosen by longest-processing-time on state bytes (ties: refresh
work, then the lowest rank), so the largest rank holds at most the mean plus one parameter's state.

Nothing here imports torch.distributed: every rank computes every rank's view with no communication.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .layout import ParamLayout
from .plan import rows_of, shard_rows

Splits = dict[int, list[tuple[int, int]]]


@dataclass(frozen=True)
class ParamState:
    """One parameter's whole SOAP state, in elements, as one process holds it."""

    statistics: int  # factor elements (row blocks' d^2 and whole column factors' d^2)
    bases: int  # as many as statistics
    moments: int  # exp_avg and exp_avg_sq
    refresh_cost: int  # sum of d^3 over its factors


def param_state(lay: ParamLayout) -> ParamState:
    """Elements and refresh work of one parameter's state (block space, one process's row blocks)."""
    sizes = [n for n in lay.row_counts] if lay.preconditioned[0] else []
    sizes += [d for d, pre in zip(lay.block_shape[1:], lay.preconditioned[1:], strict=True) if pre]
    squares = sum(d * d for d in sizes)
    return ParamState(squares, squares, 2 * math.prod(lay.block_shape), sum(d**3 for d in sizes))


def state_bytes(lay: ParamLayout, factor_bytes: int, moment_bytes: int) -> int:
    s = param_state(lay)
    return (s.statistics + s.bases) * factor_bytes + s.moments * moment_bytes


def assign_owners(
    layouts: Sequence[ParamLayout], shards: int, factor_bytes: int, moment_bytes: Sequence[int]
) -> list[int]:
    """Owner shard of every parameter: LPT on state bytes, ties broken by refresh work then rank.

    ``moment_bytes[i]`` is parameter i's bytes per moment element (8 for float64 parameters, else 4).
    """
    weights = [state_bytes(lay, factor_bytes, moment_bytes[lay.index]) for lay in layouts]
    costs = [param_state(lay).refresh_cost for lay in layouts]
    order = sorted(range(len(layouts)), key=lambda k: (-weights[k], -costs[k], k))
    loads, work = [0] * shards, [0] * shards
    owners = [0] * len(layouts)
    for k in order:
        best = min(range(shards), key=lambda r: (loads[r], work[r], r))
        owners[k] = best
        loads[best] += weights[k]
        work[best] += costs[k]
    return owners


def owner_splits(layouts: Sequence[ParamLayout], owners: Sequence[int], shards: int) -> Splits:
    """The rows each shard steps: all of them at the owner, none elsewhere (plan.build_plan's splits)."""
    return {
        lay.index: [(0, rows_of(lay)) if s == owners[k] else (0, 0) for s in range(shards)]
        for k, lay in enumerate(layouts)
    }


def held_rows(lay: ParamLayout, shards: int, shard: int) -> tuple[int, int]:
    """(first row, row count) of a parameter that a shard holds as FSDP2 cuts it (torch.chunk)."""
    if not lay.shape:
        return (0, 1) if shard == 0 else (0, 0)
    return shard_rows(lay.shape[0], shards, shard)


def crossing_elements(
    layouts: Sequence[ParamLayout], owners: Sequence[int], shards: int, active: Sequence[bool]
) -> int:
    """Elements of the active parameters held away from their owner, over the whole job."""
    total = 0
    for k, lay in enumerate(layouts):
        if not active[lay.index]:
            continue
        for s in range(shards):
            if s != owners[k]:
                total += held_rows(lay, shards, s)[1] * lay.row_elements
    return total


def step_traffic(
    layouts: Sequence[ParamLayout],
    owners: Sequence[int],
    shards: int,
    shard: int,
    grad_bytes: Sequence[int],
    update_bytes: Sequence[int],
) -> tuple[int, int]:
    """Bytes one shard sends and receives per step (every parameter active and started).

    In: each holder sends its rows' gradient to the owner. Out: the owner sends each holder the update
    of its rows. ``grad_bytes[i]``/``update_bytes[i]`` are parameter i's element sizes (the update is
    in the step's compute dtype: the wider of the moments' and the factors').
    """
    sent = received = 0
    for k, lay in enumerate(layouts):
        i, owner = lay.index, owners[k]
        if owner != shard:
            n = held_rows(lay, shards, shard)[1] * lay.row_elements
            sent += n * grad_bytes[i]
            received += n * update_bytes[i]
            continue
        for s in range(shards):
            if s != shard:
                n = held_rows(lay, shards, s)[1] * lay.row_elements
                received += n * grad_bytes[i]
                sent += n * update_bytes[i]
    return sent, received
