"""Which placement a SOAP optimizer runs under, picked from what it sees, and its process groups.

- single: no process group (or world size 1), or asked for;
- replicated: plain tensors with an initialized process group of size > 1 (DDP, ZeRO-0);
- fsdp-local: FSDP2 ``fully_shard`` DTensors, placements (Shard(0),) on a 1-D mesh;
- hsdp: DTensors with (Replicate(), Shard(0)) on a 2-D mesh;
- owner: asked for (or chosen by "auto"'s cost model) on fsdp-local or hsdp parameters; the returned
  placement then describes the mesh (fsdp-local or hsdp) and ``placements.owner`` runs on it.

Anything else fails at the first step with a message saying what is supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .comm import Groups
from .plan import PLACEMENTS, SINGLE, Topology, shard_rows

Tensor = torch.Tensor
SUPPORTED = (
    "SOAP supports: plain tensors (one process, or DDP/replicated with a process group), FSDP2 fully_shard "
    "DTensors with placements (Shard(0),), and HSDP DTensors with (Replicate(), Shard(0)) on a 2-D mesh"
)


@dataclass
class Placement:
    topology: Topology
    groups: Groups | None
    mesh: Any = None  # the DTensor mesh, for checkpoint state
    placements: tuple | None = None


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t: Tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor | None) -> Tensor | None:
    """The rank's own tensor: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if t is not None and is_dtensor(t) else t


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
        return Placement(SINGLE, None)
    if placement in ("fsdp-local", "hsdp"):
        raise ValueError(
            f"SOAP: placement={placement!r} needs FSDP2 DTensor parameters, but the parameters are plain "
            "tensors; call fully_shard on the model before its first step (or use placement='auto')"
        )
    if device_mesh is not None:
        if device_mesh.ndim != 1:
            raise ValueError("SOAP: with plain tensors, device_mesh must be 1-D (the data-parallel ranks)")
        process_group = device_mesh.get_group()
    if not (dist.is_available() and dist.is_initialized()):
        if placement == "replicated":
            raise ValueError("SOAP: placement='replicated' needs an initialized process group")
        return Placement(SINGLE, None)
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return Placement(SINGLE, None)
    rank = dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group)
    topology = Topology("replicated", world, 1, rank)
    return Placement(topology, Groups(world=group, shard=None, replicate=group, ranks=list(ranks)))


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
        kind = "fsdp-local"
        topology = Topology(kind, 1, mesh.size(), mesh.get_local_rank())
        group = mesh.get_group()
        groups = Groups(world=group, shard=group, replicate=None, ranks=mesh.mesh.flatten().tolist())
    elif placements == (Replicate(), Shard(0)):
        kind = "hsdp"
        replicas, shards = mesh.size(0), mesh.size(1)
        rank = mesh.get_local_rank(0) * shards + mesh.get_local_rank(1)
        ranks = mesh.mesh.flatten().tolist()
        if len(ranks) != dist.get_world_size():  # a world group for the mesh would need every rank
            raise ValueError(
                f"SOAP: hsdp needs the 2-D device mesh to span every rank of the default process group "
                f"(it spans {len(ranks)} of {dist.get_world_size()}); build the mesh over all ranks"
            )
        world = dist.group.WORLD
        topology = Topology(kind, replicas, shards, rank)
        groups = Groups(world=world, shard=mesh.get_group(1), replicate=mesh.get_group(0), ranks=ranks)
    else:
        raise ValueError(f"SOAP: {names[0]} has placements {placements}. " + SUPPORTED)
    if placement not in ("auto", kind):
        raise ValueError(f"SOAP: placement={placement!r} does not match the parameters, which are {kind}")
    for p, name in zip(params, names, strict=True):
        if p.dim() == 0:
            continue
        expected = shard_rows(p.shape[0], topology.shards, topology.shard)[1]
        got = p.to_local().shape[0]
        if got != expected:
            raise ValueError(
                f"SOAP: {name}'s local shard has {got} rows, expected {expected} (torch.chunk of "
                f"{p.shape[0]} rows over {topology.shards} shards); " + SUPPORTED
            )
    return Placement(topology, groups, mesh, placements)


def wrapper(placement: Placement):
    """Local rows -> a DTensor of the given global shape, sharded like the parameters."""
    if placement.mesh is None:
        return None
    from torch.distributed.tensor import DTensor

    def wrap(t: Tensor, shape: tuple[int, ...]) -> Tensor:
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            t, placement.mesh, placement.placements, run_check=False, shape=torch.Size(shape), stride=stride
        )

    return wrap
