"""When each parameter's basis refresh runs within its k steps: the refresh schedule, from shapes.

``"all"`` is the reference's: every factor at the steps divisible by k, so one step in k carries the
whole refresh. ``"staggered"`` gives each parameter a fixed phase p in [0, k) (refresh at the steps
congruent to p mod k, still every k steps), chosen by longest-processing-time on its refresh cost so
that each step carries about 1/k of it, per owner rank. Every rank computes the same phases.
"""

from __future__ import annotations

from collections import defaultdict
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
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # (owner, k) -> parameters
    for i in range(n):
        if cost[i]:
            groups[(owner[i], frequencies[i])].append(i)
    phases = [0] * n
    for (_, k), members in sorted(groups.items()):
        loads = [0] * k
        for i in sorted(members, key=lambda i: (-cost[i], i)):
            best = min(range(k), key=lambda p: (loads[p], p))
            phases[i] = best
            loads[best] += cost[i]
    return phases
