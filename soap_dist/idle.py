"""A training loop that silently does nothing: SOAP stepping tensors that never get a gradient.

The usual cause is a model wrapped after SOAP was built (FSDP2's ``fully_shard``, or
``accelerator.prepare(model)`` without the optimizer): SOAP holds the tensors the wrapper replaced,
every step skips them, and under FSDP2 the stale plain tensors even read as DDP replicas. torch.optim
is silent here; SOAP says so once.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch


def warn_if_never_a_gradient(flags: dict[str, Any], params: list[torch.Tensor], active: list[bool]) -> None:
    """Warn once (per optimizer, whose ``__dict__`` is ``flags``) when no trainable parameter has had a
    gradient yet. Parameters a wrapper replaced keep requires_grad; frozen ones say nothing, and a step
    without gradients once training has begun (a skipped batch) says nothing either."""
    if any(active):
        flags["_had_gradient"] = True
        return
    trainable = sum(p.requires_grad for p in params)
    if trainable and not flags.get("_had_gradient") and not flags.get("_warned_idle"):
        flags["_warned_idle"] = True
        warnings.warn(
            f"SOAP.step(): none of its {trainable} trainable parameters has had a gradient yet, so "
            "nothing was updated. If the model was wrapped after SOAP was built (FSDP2's fully_shard, "
            "or accelerator.prepare(model) without the optimizer), SOAP holds the tensors the wrapper "
            "replaced: build SOAP from the wrapped model's parameters, or prepare both in one call. "
            "Else call step() after backward().",
            stacklevel=callers_level(),
        )


def callers_level() -> int:
    """warnings.warn's stacklevel of the first frame outside torch and soap_dist: the user's call,
    through torch's step wrappers and any LR scheduler's."""
    folders = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    inside = tuple(os.path.join(folder, "") for folder in folders)  # torchtitan/ is not inside torch/
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
