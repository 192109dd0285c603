"""Placement "fsdp-local" (FSDP2 ``fully_shard``, Shard(0) DTensors): local.

Each rank steps its own rows. Its row blocks' factors stay with it; the column factors are shared:
their partial statistics are reduced to an owner at each refresh, whose basis is broadcast to
every rank holding rows. The result depends on how rows are cut into blocks: it equals one process
only when ``block_size`` divides every shard's rows (docs/design.md, section 6), and ``"auto"`` picks
it only then. Every column statistic and basis is whole on every rank, so ``"auto"`` also prefers
placement owner when that column state would exceed the rank's parameter shard.
"""

from __future__ import annotations

from typing import Any

from ..comm import Groups
from ..plan import Topology
from .tensors import Placement


def build(mesh: Any, placements: tuple) -> Placement:
    """The 1-D mesh's ranks as a 1 x W grid."""
    topology = Topology("fsdp-local", 1, mesh.size(), mesh.get_local_rank())
    group = mesh.get_group()
    groups = Groups(world=group, shard=group, replicate=None, ranks=mesh.mesh.flatten().tolist())
    return Placement(topology, groups, mesh, placements)
