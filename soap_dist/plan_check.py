"""What every rank checks at its first step, before any collective whose sizes follow the plan.

The ranks must agree on the plan, on what else sets the collectives' order (the options folded into
each parameter's hash), and on which tensor each parameter is: its name when given
(named_parameters), under replicated a fingerprint of its values (DDP made them equal on every
replica), and under HSDP a fingerprint of each shard compared between its replicas. One small
all_gather (``comm.Exchange.check_plan``); a mismatch is named, with the options that differ.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .comm import Exchange
from .layout import ParamLayout
from .placements import local

Tensor = torch.Tensor


def plan_options(soap: Any, groups: list[dict], lay: ParamLayout) -> dict[str, Any]:
    """The options beside the shapes that set a parameter's collectives, by name (for the message)."""
    return {
        "precondition_frequency": groups[lay.group]["precondition_frequency"],
        "refresh_delay": soap.refresh_delay,
        "factor_dtype": str(soap.factor_dtype),
        "refresh_schedule": soap.refresh_schedule,
        "basis_dtype": str(soap.basis_dtype),
        "owner_scope": soap.owner_scope,
    }


def check_first_step(
    soap: Any,
    exchange: Exchange,
    full: list[ParamLayout],
    groups: list[dict],
    across: Any = None,
    params: list[Tensor] | None = None,
) -> None:
    """PlanMismatchError on every rank when the ranks differ (see the module's docstring).

    ``across`` = (process group, its size, this rank's place in it, its global ranks): check over
    that group instead of the exchange's (owner under HSDP: the whole mesh).
    """
    options = [plan_options(soap, groups, lay) for lay in full]
    extras = [tuple(o.values()) for o in options]
    given = [n for g in groups for n in (g.get("param_names") or [None] * len(g["params"]))]
    if len(given) != len(full):  # DeepSpeed's groups hold flat partitions, not the parameters
        given = [None] * len(full)
    fingerprints: list[Any] = [None] * len(full)
    placement = soap._placement
    grid = placement.topology if params and placement is not None else None  # (ZeRO: none)
    if grid is not None and grid.replicas > 1 and grid.placement in ("replicated", "hsdp"):
        # one host read, at build; under HSDP of this rank's shards, compared between the replicas.
        # An integer sum of the bits: exact, so the same whatever the summation order (threads).
        sums = torch.stack(
            [local(p).detach().reshape(-1).view(torch.int16).sum(dtype=torch.int64) for p in params]
        )
        fingerprints = sums.tolist()
        if grid.placement == "hsdp":
            mesh = placement.groups
            members = [mesh.ranks[t] for t in grid.replica_group(grid.shard)]
            agree = exchange.replicas_agree(fingerprints, mesh.replicate, members)
            # each replica tells its own index where they differ (an alike verdict passes check_plan)
            fingerprints = [True if ok else ("differs", grid.replica) for ok in agree]
    identities = [
        int.from_bytes(hashlib.blake2b(repr((n, f)).encode(), digest_size=8).digest(), "little") >> 1
        for n, f in zip(given, fingerprints, strict=True)
    ]
    names = [lay.name for lay in full]

    def describe(i: int) -> dict[str, Any]:  # what the message compares, on the error path only
        lay = full[i]
        shapes = {"shape": lay.shape, "block shape": lay.block_shape, "param group": lay.group}
        return {**shapes, **options[i]}

    exchange.check_plan(exchange.plan.param_hashes(full, extras), names, across, identities, describe)
