"""When each parameter's basis refresh runs within its k steps: the refresh schedule, from shapes.

``"all"`` is the reference's: every factor at the steps divisible by k, so one step in k carries the
whole refresh. ``"staggered"`` gives each parameter a fixed phase p in [0, k) (refresh at the steps
congruent to p mod k, still every k steps), chosen by longest-processing-time on its refresh cost so
that each step carries about 1/k of it, per owner rank. Between phases an owner has equally loaded,
the one least loaded over all owners wins: where owners hold one parameter each (W near the number of
matrices) the refreshes and their broadcasts still spread over the k steps instead of all landing on
phase 0. Every rank computes the same phases.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import Plan

SCHEDULES = ("all", "staggered")


def refresh_phases(plan: Plan, frequencies: Sequence[int], schedule: str) -> list[int]:
    """Phase of every parameter (index order); ``frequencies[i]`` is its k."""
    n = len(plan.layouts)
    if schedule == "all":
        return [0] * n
    cost = [0] * n
    owner = [-1] * n
    biggest = [-1] * n
    for e in plan.entries:
        cost[e.param] += e.cost
        if e.cost > biggest[e.param]:
            biggest[e.param], owner[e.param] = e.cost, e.owner
    phases = [0] * n
    loads: dict[tuple[int, int], list[int]] = {}  # (owner, k) -> the owner's load per phase
    overall: dict[int, list[int]] = {}  # k -> every owner's load per phase
    for i in sorted((i for i in range(n) if cost[i]), key=lambda i: (-cost[i], i)):
        k = frequencies[i]
        mine, everyone = loads.setdefault((owner[i], k), [0] * k), overall.setdefault(k, [0] * k)
        best = min(range(k), key=lambda p: (mine[p], everyone[p], p))
        phases[i] = best
        mine[best] += cost[i]
        everyone[best] += cost[i]
    return phases
