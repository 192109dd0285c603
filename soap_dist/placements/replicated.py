"""Placement "replicated" (DDP, ZeRO-0): exact.

Every rank has the whole gradient (DDP's all-reduce) and every parameter. Each factor has one
owner (LPT on refresh cost), which alone keeps its statistic and broadcasts its new basis to all
ranks: statistics memory and refresh work are divided by W, and the result equals one process to
rounding (within 1e-12 in float64 in the tests: an owner decomposes its factors in a smaller batch,
and batched eigh rounds by batch makeup); the replicas equal each other bitwise.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..comm import Groups
from ..plan import Topology
from . import single
from .tensors import Placement


def build(process_group: Any = None, device_mesh: Any = None, forced: bool = False) -> Placement:
    """The data-parallel group (default: the world group; or a 1-D mesh's), as a W x 1 grid."""
    if device_mesh is not None:
        if device_mesh.ndim != 1:
            raise ValueError("SOAP: with plain tensors, device_mesh must be 1-D (the data-parallel ranks)")
        process_group = device_mesh.get_group()
    if not (dist.is_available() and dist.is_initialized()):
        if forced:
            raise ValueError("SOAP: placement='replicated' needs an initialized process group")
        return single.build()
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return single.build()
    rank = dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group)
    topology = Topology("replicated", world, 1, rank)
    return Placement(topology, Groups(world=group, shard=None, replicate=group, ranks=list(ranks)))
