"""Which placement a SOAP optimizer runs under, picked in one place from what it sees.

- single: no process group (or world size 1), or asked for;
- replicated: plain tensors with an initialized process group of size > 1 (DDP, ZeRO-0);
- fsdp-local: FSDP2 ``fully_shard`` DTensors, placements (Shard(0),) on a 1-D mesh;
- hsdp: DTensors with (Replicate(), Shard(0)) on a 2-D mesh;
- owner: asked for (or chosen by "auto"'s cost model, in the optimizer) on fsdp-local or hsdp
  parameters; the returned placement then describes the mesh and ``placements.owner`` runs on it;
- zero: DeepSpeed ZeRO 1-3's flat partitions, found by ``integrations.deepspeed_zero``, never here.

Anything else fails at the first step with a message saying what is supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..plan import PLACEMENTS, shard_rows
from . import fsdp_local, hsdp, replicated, single
from .tensors import Placement, is_dtensor

Tensor = torch.Tensor
SUPPORTED = (
    "SOAP supports: plain tensors (one process, or DDP/replicated with a process group), FSDP2 fully_shard "
    "DTensors with placements (Shard(0),), and HSDP DTensors with (Replicate(), Shard(0)) on a 2-D mesh"
)


def resolve(
    params: Sequence[Tensor],
    names: Sequence[str],
    placement: str = "auto",
    process_group: Any = None,
    device_mesh: Any = None,
) -> Placement:
    if placement not in ("auto", *PLACEMENTS):
        raise ValueError(f"SOAP: invalid placement={placement!r}; expected 'auto' or one of {PLACEMENTS}")
    for p, name in zip(params, names, strict=True):
        if type(p).__name__ == "FlatParameter" or hasattr(p, "_is_flat_param"):
            raise ValueError(
                f"SOAP: {name} is an FSDP1 flat parameter; FSDP1 is not supported. Use FSDP2 "
                "(torch.distributed.fsdp.fully_shard). " + SUPPORTED
            )
    dtensors = [is_dtensor(p) for p in params]
    if placement == "owner" and not all(dtensors):
        raise ValueError(
            "SOAP: placement='owner' needs FSDP2 fully_shard DTensor parameters (placements (Shard(0),)) or "
            "HSDP ones ((Replicate(), Shard(0))), but the parameters are plain tensors; under DDP use "
            "placement='replicated' (or 'auto')"
        )
    if any(dtensors):
        if not all(dtensors):
            plain = names[dtensors.index(False)]
            raise ValueError(
                f"SOAP: {plain} is a plain tensor while other parameters are DTensors; shard every "
                "parameter with fully_shard (or give the plain ones to another optimizer). " + SUPPORTED
            )
        try:
            return _from_dtensors(params, names, "auto" if placement == "owner" else placement, device_mesh)
        except ValueError as error:
            if placement == "owner":
                raise ValueError(
                    f"{error} (placement='owner' moves whole rows to each parameter's owner)"
                ) from None
            raise
    if placement == "single":
        return single.build()
    if placement in ("fsdp-local", "hsdp"):
        raise ValueError(
            f"SOAP: placement={placement!r} needs FSDP2 DTensor parameters, but the parameters are plain "
            "tensors; call fully_shard on the model before its first step (or use placement='auto')"
        )
    return replicated.build(process_group, device_mesh, forced=placement == "replicated")


def _from_dtensors(params, names, placement, device_mesh) -> Placement:
    from torch.distributed.tensor import Replicate, Shard

    mesh = params[0].device_mesh
    if device_mesh is not None and device_mesh != mesh:
        raise ValueError("SOAP: device_mesh differs from the mesh the parameters are sharded on")
    placements = tuple(params[0].placements)
    for p, name in zip(params, names, strict=True):
        if p.device_mesh != mesh:
            raise ValueError(f"SOAP: {name} lives on a different device mesh than the first parameter")
        if tuple(p.placements) != placements:
            raise ValueError(
                f"SOAP: {name} has placements {tuple(p.placements)}, the first parameter {placements}; "
                + SUPPORTED
            )
    if placements == (Shard(0),):
        kind, where = "fsdp-local", fsdp_local.build(mesh, placements)
    elif placements == (Replicate(), Shard(0)):
        kind, where = "hsdp", hsdp.build(mesh, placements)
    else:
        raise ValueError(f"SOAP: {names[0]} has placements {placements}. " + SUPPORTED)
    if placement not in ("auto", kind):
        raise ValueError(f"SOAP: placement={placement!r} does not match the parameters, which are {kind}")
    for p, name in zip(params, names, strict=True):
        if p.dim() == 0:
            continue
        expected = shard_rows(p.shape[0], where.topology.shards, where.topology.shard)[1]
        got = p.to_local().shape[0]
        if got != expected:
            raise ValueError(
                f"SOAP: {name}'s local shard has {got} rows, expected {expected} (torch.chunk of "
                f"{p.shape[0]} rows over {where.topology.shards} shards); " + SUPPORTED
            )
    return where
