"""Placement "owner", as pure functions of shapes: who owns each parameter, and what moves each step.

Every parameter has one owner inside a shard group. The owner holds the whole matrix's SOAP state
(statistics, bases, moments) and runs the one-process step on it; the other shards only hold their
rows of the parameter. Owners are chosen by longest-processing-time on state bytes (ties: refresh
work, then the lowest rank), so the largest rank holds at most the mean plus one parameter's state.

A parameter whose rows carry no factor (an embedding whose vocabulary exceeds max_precond_dim, a
bias) can instead stay *spread*: each shard steps the rows FSDP2 gave it, as under fsdp-local, and
only its column factors are shared (partial statistics reduced at the refresh, the basis broadcast).
That is still exact (no row factor means no approximation), moves none of its rows, and takes the
largest parameter out of the bound above; the price is its column statistics and basis on every
shard. ``spread_params`` spreads parameters only where that lowers the estimated largest rank state.

Under HSDP (R replicas of S shards) owners are chosen among all R x S ranks, so state shrinks as 1/W:
rank ``replica * S + shard`` may own a parameter, gathers its gradient rows from its own replica's
shard group, and its update reaches the other replicas through the replicate group. A spread
parameter's FSDP2 chunk is cut again among the replicas (``spread_rows``). With ``replicas=1`` (FSDP2,
or HSDP with ``owner_scope="shard_group"``) every function is the shard group's alone.

Nothing here imports torch.distributed: every rank computes every rank's view with no communication.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .layout import ParamLayout
from .plan import rows_of, shard_rows

Splits = dict[int, list[tuple[int, int]]]
SPREAD = -1  # the owner of a spread parameter: none, every shard steps its own rows


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


def spreadable(lay: ParamLayout, normalized: bool = False) -> bool:
    """Rows with no factor, in the parameter's own row order, and an update not normalised per block
    (``normalize_grads`` couples a block's rows): stepping them where they lie is exact."""
    return bool(lay.shape) and lay.permutation is None and not lay.preconditioned[0] and not normalized


def spread_params(
    layouts: Sequence[ParamLayout],
    shards: int,
    factor_bytes: int,
    moment_bytes: Sequence[int],
    normalized: Sequence[bool] | None = None,
    *,
    replicas: int = 1,
) -> frozenset[int]:
    """The parameters to leave spread over the shard group (see the module docstring).

    The estimate of the largest rank's state is ``spread + max(rest / shards, largest of the rest)``:
    what every shard holds of the spread parameters (its moment rows, their whole column statistics
    and bases) plus LPT's load on the others. The candidates, largest first, are spread up to the
    prefix with the lowest estimate (a prefix, not one at a time: an untied embedding and head of
    one size only lower it together). ``normalized[i]``: parameter i's group has normalize_grads
    (never spread). ``replicas`` > 1: owners over every rank of an HSDP mesh. A pure function of
    shapes and options: every rank decides alike.
    """
    ranks = replicas * shards
    if ranks == 1:
        return frozenset()
    whole = [state_bytes(lay, factor_bytes, moment_bytes[lay.index]) for lay in layouts]
    order = sorted(range(len(layouts)), key=lambda k: (-whole[k], k))
    candidates = [
        k
        for k in order
        if spreadable(layouts[k], bool(normalized[layouts[k].index]) if normalized else False)
    ]

    def estimate(spread: set[int], added: int, rest: int) -> float:
        largest = next((whole[k] for k in order if k not in spread), 0)
        return added + max(rest / ranks, largest)

    chosen: set[int] = set()
    best = estimate(chosen, 0, sum(whole))
    trial: set[int] = set()
    added, rest = 0, sum(whole)
    for k in candidates:
        trial.add(k)
        # rank 0 holds the most rows (torch.chunk, twice), so its share is the largest
        share = spread_share(layouts[k], shards, 0, factor_bytes, moment_bytes[layouts[k].index], replicas)
        added, rest = added + share, rest - whole[k]
        value = estimate(trial, added, rest)
        if value < best:
            best, chosen = value, set(trial)
    spread = frozenset(layouts[k].index for k in chosen)
    if spread and largest_state(
        layouts, shards, factor_bytes, moment_bytes, spread, replicas=replicas
    ) >= largest_state(
        layouts, shards, factor_bytes, moment_bytes, replicas=replicas
    ):  # the estimate is rough: keep the spread only where LPT's real outcome is lower
        return frozenset()
    return spread


def largest_state(
    layouts: Sequence[ParamLayout],
    shards: int,
    factor_bytes: int,
    moment_bytes: Sequence[int],
    spread: frozenset[int] = frozenset(),
    *,
    replicas: int = 1,
) -> int:
    """The largest rank's state bytes: its owned parameters' whole state, plus, of each spread one,
    its moment rows and (where it holds rows) the whole column statistics and bases."""
    ranks = replicas * shards
    owners = assign_owners(layouts, ranks, factor_bytes, moment_bytes, spread, replicas)
    loads = [0] * ranks
    for k, lay in enumerate(layouts):
        mb = moment_bytes[lay.index]
        if owners[k] != SPREAD:
            loads[owners[k]] += state_bytes(lay, factor_bytes, mb)
            continue
        for r in range(ranks):
            loads[r] += spread_share(lay, shards, r, factor_bytes, mb, replicas)
    return max(loads)


def spread_rows(lay: ParamLayout, shards: int, rank: int, replicas: int = 1) -> tuple[int, int]:
    """(first row, row count) that rank ``replica * shards + shard`` steps of a spread parameter: its
    shard's FSDP2 rows (torch.chunk), cut again among the replicas the same way."""
    first, count = held_rows(lay, shards, rank % shards)
    if replicas == 1:
        return first, count
    sub_first, sub_count = shard_rows(count, replicas, rank // shards)
    return first + sub_first, sub_count


def spread_share(
    lay: ParamLayout, shards: int, rank: int, factor_bytes: int, moment_bytes: int, replicas: int = 1
) -> int:
    """The state bytes a rank holds of a spread parameter: the moments of its rows, and, if it holds
    any, the whole column statistics and bases (partial statistics are whole-sized)."""
    rows = spread_rows(lay, shards, rank, replicas)[1]
    if not rows:
        return 0
    state = param_state(lay)
    return (state.statistics + state.bases) * factor_bytes + 2 * rows * lay.row_elements * moment_bytes


def assign_owners(
    layouts: Sequence[ParamLayout],
    shards: int,
    factor_bytes: int,
    moment_bytes: Sequence[int],
    spread: frozenset[int] = frozenset(),
    replicas: int = 1,
) -> list[int]:
    """Owner of every parameter among ``shards`` ranks (``SPREAD`` for those in ``spread``): LPT on
    state bytes, ties broken by refresh work then rank. With ``replicas`` > 1 the ``shards`` ranks
    form replicas x (shards / replicas), and ties go round the replicas first, so parameters fewer
    than ranks land in every replica alike (each replica sends its rows' updates to the others).

    ``moment_bytes[i]`` is parameter i's bytes per moment element (8 for float64 parameters, else 4).
    """
    weights = [state_bytes(lay, factor_bytes, moment_bytes[lay.index]) for lay in layouts]
    costs = [param_state(lay).refresh_cost for lay in layouts]
    order = sorted(range(len(layouts)), key=lambda k: (-weights[k], -costs[k], k))
    loads, work = [0] * shards, [0] * shards
    owners = [SPREAD] * len(layouts)
    per_replica = shards // replicas
    for k in order:
        if layouts[k].index in spread:
            continue
        best = min(range(shards), key=lambda r: (loads[r], work[r], r % per_replica, r))
        owners[k] = best
        loads[best] += weights[k]
        work[best] += costs[k]
    return owners


def owner_splits(
    layouts: Sequence[ParamLayout], owners: Sequence[int], shards: int, replicas: int = 1
) -> Splits:
    """The rows each rank steps (plan.build_plan's splits, over ``replicas * shards`` ranks): all of
    them at the owner, none elsewhere; a spread parameter's ``spread_rows``."""

    def rows(k: int, lay: ParamLayout, r: int) -> tuple[int, int]:
        if owners[k] == SPREAD:
            return spread_rows(lay, shards, r, replicas)
        return (0, rows_of(lay)) if r == owners[k] else (0, 0)

    ranks = replicas * shards
    return {lay.index: [rows(k, lay, r) for r in range(ranks)] for k, lay in enumerate(layouts)}


def owner_placement(
    layouts: Sequence[ParamLayout],
    shards: int,
    factor_bytes: int,
    moment_bytes: Sequence[int],
    normalized: Sequence[bool] | None = None,
    *,
    replicas: int = 1,
) -> tuple[list[int], Splits]:
    """Placement owner under FSDP2/HSDP: the owners (``SPREAD`` where spread) among ``replicas *
    shards`` ranks, and the engine's splits."""
    spread = spread_params(layouts, shards, factor_bytes, moment_bytes, normalized, replicas=replicas)
    owners = assign_owners(layouts, replicas * shards, factor_bytes, moment_bytes, spread, replicas)
    return owners, owner_splits(layouts, owners, shards, replicas)


def held_rows(lay: ParamLayout, shards: int, shard: int) -> tuple[int, int]:
    """(first row, row count) of a parameter that a shard holds as FSDP2 cuts it (torch.chunk)."""
    if not lay.shape:
        return (0, 1) if shard == 0 else (0, 0)
    return shard_rows(lay.shape[0], shards, shard)


def crossing_elements(
    layouts: Sequence[ParamLayout], owners: Sequence[int], shards: int, active: Sequence[bool]
) -> int:
    """Elements of the active owned parameters that the owner's shard group holds away from the
    owner (what the shard-group exchanges move), over the whole job."""
    total = 0
    for k, lay in enumerate(layouts):
        if not active[lay.index] or owners[k] == SPREAD:
            continue
        for s in range(shards):
            if s != owners[k] % shards:
                total += held_rows(lay, shards, s)[1] * lay.row_elements
    return total


def step_traffic(
    layouts: Sequence[ParamLayout],
    owners: Sequence[int],
    shards: int,
    rank: int,
    grad_bytes: Sequence[int],
    update_bytes: Sequence[int],
    replicas: int = 1,
) -> tuple[int, int]:
    """Bytes one rank (``replica * shards + shard``) sends and receives per step (every parameter
    active and started).

    In: each holder in the owner's replica sends its rows' gradient to the owner. Out: the owner sends
    each of them the update of its rows, and with ``replicas`` > 1 each of them forwards its rows'
    update to the ranks of the other replicas that hold the same shard (a spread parameter's rows:
    each rank its own part of the shard). ``grad_bytes[i]``/``update_bytes[i]`` are parameter i's
    element sizes (the update is in the step's compute dtype: the wider of the moments' and the
    factors').
    """
    replica, shard = divmod(rank, shards)
    sent = received = 0
    for k, lay in enumerate(layouts):
        i, owner, width = lay.index, owners[k], lay.row_elements
        mine = held_rows(lay, shards, shard)[1] * width  # this rank's rows of the parameter
        if owner == SPREAD:  # its rows never travel to an owner; replicas share their parts
            if replicas > 1:
                part = spread_rows(lay, shards, rank, replicas)[1] * width
                sent += part * update_bytes[i] * (replicas - 1)
                received += (mine - part) * update_bytes[i]
            continue
        owner_replica, owner_shard = divmod(owner, shards)
        if replica != owner_replica:  # the update of its rows comes from its own shard's rank there
            received += mine * update_bytes[i]
            continue
        sent += mine * update_bytes[i] * (replicas - 1)
        if owner_shard != shard:
            sent += mine * grad_bytes[i]
            received += mine * update_bytes[i]
            continue
        for s in range(shards):
            if s != shard:
                n = held_rows(lay, shards, s)[1] * width
                received += n * grad_bytes[i]
                sent += n * update_bytes[i]
    return sent, received
