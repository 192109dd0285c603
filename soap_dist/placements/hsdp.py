"""Placement "hsdp" (HSDP: (Replicate(), Shard(0)) on a 2-D mesh): local, like fsdp-local.

fsdp-local inside each replica's shard group; a column factor's partial statistics live only in
its owner's replica, row factors are owned by one replica of their shard and broadcast over the
replicate group. The mesh must span every rank (column bases are broadcast over the world group).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..comm import Groups
from ..plan import Topology
from .tensors import Placement


def build(mesh: Any, placements: tuple) -> Placement:
    """The 2-D mesh as an R x S grid: replicas on mesh dim 0, shards on mesh dim 1."""
    replicas, shards = mesh.size(0), mesh.size(1)
    rank = mesh.get_local_rank(0) * shards + mesh.get_local_rank(1)
    ranks = mesh.mesh.flatten().tolist()
    if len(ranks) != dist.get_world_size():  # a world group for the mesh would need every rank
        raise ValueError(
            f"SOAP: hsdp needs the 2-D device mesh to span every rank of the default process group "
            f"(it spans {len(ranks)} of {dist.get_world_size()}); build the mesh over all ranks"
        )
    topology = Topology("hsdp", replicas, shards, rank)
    groups = Groups(world=dist.group.WORLD, shard=mesh.get_group(1), replicate=mesh.get_group(0), ranks=ranks)
    return Placement(topology, groups, mesh, placements)
