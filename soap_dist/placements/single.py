"""Placement "single": one process (no process group, or a world of one). Exact by definition."""

from __future__ import annotations

from ..plan import SINGLE
from .tensors import Placement


def build() -> Placement:
    return Placement(SINGLE, None)
