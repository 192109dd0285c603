"""SOAP's step computes at its own precision, whatever autocast region the caller steps in.

Elementwise optimizers are untouched by autocast, so stepping inside ``torch.autocast`` is common;
SOAP's rotations and refresh products are matmuls, which autocast would run in bf16/fp16, silently
(small unscaled gradients would lose their precision in the rotation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


@contextlib.contextmanager
def autocast_off(device_types: Iterable[str]) -> Iterator[None]:
    """Turn autocast off, for the scope, on each of ``device_types`` where it is on."""
    with contextlib.ExitStack() as stack:
        for device_type in sorted(set(device_types)):
            try:
                on = torch.is_autocast_enabled(device_type)
            except RuntimeError:  # a device type autocast does not know ("meta"): never on
                continue
            if on:
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
