"""Shape rules: how one parameter becomes blocks and factors.

Everything here is a function of shapes and options only, so every rank of a job computes the
same table with no communication. The rules are the algorithm page's (1-D, n-D, merge_dims with
channels_first/channels_last, strict max_precond_dim, precondition_1d) plus the blocking rule of
the design brief (../shared/DESIGN.md; docs/design.md, section 1): dim 0 is cut into row blocks of at
most ``block_size`` rows, each with its own row factor, while the factors of the other dims stay
whole and are shared by all row blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CHANNELS_LAST_PERMUTATION = (0, 3, 1, 2)


@dataclass(frozen=True)
class ParamLayout:
    """Where one parameter's SOAP state lives, in *block space* (after permute and merge)."""

    index: int
    group: int
    name: str
    shape: tuple[int, ...]
    permutation: tuple[int, ...] | None
    block_shape: tuple[int, ...]
    preconditioned: tuple[bool, ...]
    row_counts: tuple[int, ...]
    block_size: int | None = None

    @property
    def row_offsets(self) -> tuple[int, ...]:
        offsets, start = [], 0
        for rows in self.row_counts:
            offsets.append(start)
            start += rows
        return tuple(offsets)

    @property
    def permuted_shape(self) -> tuple[int, ...]:
        if self.permutation is None:
            return self.shape
        return tuple(self.shape[i] for i in self.permutation)

    def block_dims(self, block: int) -> tuple[int, ...]:
        return (self.row_counts[block], *self.block_shape[1:])

    @property
    def row_elements(self) -> int:
        """Elements in one row of dim 0 of the parameter's own shape (the unit shards are cut in)."""
        return math.prod(self.shape[1:])

    @property
    def block_rows_per_row(self) -> int:
        """Block-space rows per parameter row: merged dims make one parameter row several block rows."""
        rows = self.shape[0] if self.shape else 1
        return self.block_shape[0] // rows if rows else 1

    @property
    def row_factor_width(self) -> int:
        """Width of the compact row-factor tensor: each row block's factor padded to this."""
        return max(self.row_counts)


def merge_dims(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """Greedily merge adjacent dims while their product stays <= max_precond_dim (the page's rule)."""
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


def plan_param(
    index: int,
    group: int,
    name: str,
    shape: tuple[int, ...],
    *,
    max_precond_dim: int,
    merge: bool,
    precondition_1d: bool,
    data_format: str,
    block_size: int | None,
) -> ParamLayout:
    """Apply the shape rules and the blocking rule to one parameter shape."""
    shape = tuple(int(s) for s in shape)
    permutation = None
    if len(shape) <= 1:
        block_shape = (math.prod(shape),)
        preconditioned = (precondition_1d and block_shape[0] <= max_precond_dim,)
    else:
        permuted = shape
        if merge and data_format == "channels_last" and len(shape) == 4:
            permutation = CHANNELS_LAST_PERMUTATION
            permuted = tuple(shape[i] for i in permutation)
        block_shape = merge_dims(permuted, max_precond_dim) if merge else permuted
        preconditioned = tuple(d <= max_precond_dim for d in block_shape)
    return ParamLayout(
        index,
        group,
        name,
        shape,
        permutation,
        block_shape,
        preconditioned,
        _cut(block_shape[0], block_size),
        block_size,
    )


def plan_in_group(
    index: int, group_index: int, name: str, shape: tuple[int, ...], group: dict
) -> ParamLayout:
    """``plan_param`` with the layout options of a torch.optim param group."""
    return plan_param(
        index,
        group_index,
        name,
        shape,
        max_precond_dim=group["max_precond_dim"],
        merge=group["merge_dims"],
        precondition_1d=group["precondition_1d"],
        data_format=group["data_format"],
        block_size=group["block_size"],
    )


def _cut(rows: int, block_size: int | None) -> tuple[int, ...]:
    cut = rows if block_size is None or rows == 0 else min(block_size, rows)
    return tuple(min(cut, rows - start) for start in range(0, rows, cut)) if rows else ()


def restrict_rows(full: ParamLayout, rows: int) -> ParamLayout:
    """The layout of ``rows`` rows of dim 0 of a parameter (a shard), with the full parameter's decisions.

    Whether a dim is preconditioned stays decided on the full parameter; only the row blocks are
    cut anew, inside the shard (a row block never crosses a shard boundary).
    """
    if not full.shape:  # a scalar is never sharded
        return full
    if rows == full.shape[0]:
        return full
    shape = (rows, *full.shape[1:])
    block_shape = (rows * full.block_rows_per_row, *full.block_shape[1:])
    return ParamLayout(
        full.index,
        full.group,
        full.name,
        shape,
        full.permutation,
        block_shape,
        full.preconditioned,
        _cut(block_shape[0], full.block_size),
        full.block_size,
    )
