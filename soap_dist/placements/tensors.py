"""What every placement shares: the ``Placement`` record, and DTensor helpers (local shard, wrap)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..comm import Groups
from ..plan import Topology

Tensor = torch.Tensor


@dataclass
class Placement:
    """A rank's place in the replicas x shards grid, its process groups, and the parameters' mesh."""

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
