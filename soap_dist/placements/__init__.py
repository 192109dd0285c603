"""Placements: one module each, detected in one place (``detect.resolve``).

Each module says in its docstring whether it is *exact* (equals one process at any world size) or
*local* (its result depends on how the rows are sharded): single, replicated and owner are exact;
zero is exact for its ``block_size``; fsdp-local and hsdp are local unless ``block_size`` divides
every shard's rows. ``tensors`` holds what they share; ``rows.HomeRowsRunner`` is the
gather -> step -> scatter runner under both owner and zero.
"""

from .detect import SUPPORTED, resolve
from .tensors import Placement, is_dtensor, local, wrapper

__all__ = ["SUPPORTED", "Placement", "is_dtensor", "local", "resolve", "wrapper"]
