"""Stacked storage: factor stores (batched by dimension) and block stacks (batched by shape).

A factor store holds every factor of one size d, ``[N, d, d]``, so a refresh is a few batched calls
per dimension (chunks of at most 512 MiB: engine.refresh). A block stack holds the moments of every
block of one shape, ``[B, *dims]``, so a step is a few batched matmuls per shape. Both are allocated
once, at the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import ParamLayout

Tensor = torch.Tensor


@dataclass(frozen=True)
class FactorSlot:
    """Which parameter, block dim and (for dim 0) row block a store slot belongs to."""

    param: int
    dim: int
    block: int  # row block for dim 0, -1 for a factor shared by all row blocks


class FactorStore:
    """All factors and bases of one size, one dtype, one device."""

    def __init__(
        self, size: int, dtype: torch.dtype, device: torch.device, basis_dtype: torch.dtype | None = None
    ) -> None:
        self.size, self.dtype, self.device = size, dtype, device
        self.basis_dtype = basis_dtype or dtype  # bases may be stored narrower (bf16) than statistics
        self.slots: list[FactorSlot] = []
        self.contributors: list[int] = []
        self.stat_rows: list[int] = []  # slot -> row of ``factors``, -1 where this rank keeps no statistic
        self.factors = torch.empty(0)
        self.bases = torch.empty(0)

    def allocate(self, slot: FactorSlot) -> int:
        self.slots.append(slot)
        self.contributors.append(0)
        return len(self.slots) - 1

    def materialize(self, accumulates: list[bool] | None = None) -> None:
        """Allocate bases for every slot and statistics for the slots this rank accumulates."""
        n, d = len(self.slots), self.size
        keep = [True] * n if accumulates is None else accumulates
        rows = iter(range(n))
        self.stat_rows = [next(rows) if k else -1 for k in keep]
        self.factors = torch.zeros(sum(keep), d, d, dtype=self.dtype, device=self.device)
        eye = torch.eye(d, dtype=self.basis_dtype, device=self.device)
        self.bases = eye.expand(n, d, d).clone()


@dataclass
class BlockDim:
    """How the blocks of a stack reach their factors of one block dim."""

    store: FactorStore
    slots: list[int]
    contiguous: slice | None  # set when the blocks own consecutive, unshared slots
    stat_rows: list[int] = field(default_factory=list)  # per block: row of store.factors, or -1
    stat_contiguous: slice | None = None  # every block accumulates, into consecutive unshared rows


@dataclass
class BlockStack:
    """Blocks of equal shape from one param group: their moments live here, stacked."""

    group: int
    dims: tuple[int, ...]
    param_dtype: torch.dtype
    members: list[tuple[ParamLayout, int]] = field(default_factory=list)  # (layout, row block)
    block_dims: list[BlockDim | None] = field(default_factory=list)
    exp_avg: Tensor = field(default_factory=lambda: torch.empty(0))
    exp_avg_sq: Tensor = field(default_factory=lambda: torch.empty(0))
    param_index: Tensor = field(default_factory=lambda: torch.empty(0))


def moment_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """float32, or the parameter's dtype if it is wider (float64)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32
