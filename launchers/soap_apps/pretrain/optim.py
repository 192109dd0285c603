"""Parameter groups and the optimizer (SOAP or AdamW) from ``OptimConfig``.

Weight decay goes to matrices only (2-D weights: linear layers and embeddings); biases and
LayerNorm gains get none, for both optimizers, so the two differ only in the update rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from soap_apps import soap_options
from soap_apps.pretrain.config import OptimConfig
from soap_dist import SOAP


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: the 2-D (or higher) weights with ``weight_decay``, every other parameter without.

    Call it on the wrapped model (FSDP2 replaces parameters by DTensors in place; the groups must
    hold the objects the optimizer will step). Names go along (``param_names``) for SOAP's messages.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in group], "param_names": [n for n, _ in group], "weight_decay": wd}
        for group, wd in ((decay, weight_decay), (no_decay, 0.0))
        if group
    ]


# optim.* keys that reach SOAP beyond the SOAP_KEYS fine-tuning shares (as JSON-ready values)
PRETRAIN_SOAP_KEYS = ("refresh_schedule", "basis_dtype", "async_refresh", "owner_scope")


def soap_kwargs(cfg: OptimConfig) -> dict[str, Any]:
    """SOAP's keyword arguments from the config (shared with the DeepSpeed JSON's optimizer params):
    ``basis_dtype`` as its name ("bfloat16"), which SOAP's builders here and in soap_dist.deepspeed
    turn into a torch dtype."""
    kwargs = soap_options.soap_kwargs(**{key: getattr(cfg, key) for key in soap_options.SOAP_KEYS})
    return kwargs | {key: getattr(cfg, key) for key in PRETRAIN_SOAP_KEYS}


def build_optimizer(
    groups: list[dict[str, Any]], cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """SOAP or torch AdamW over ``groups`` (the lr is set every step by the schedule)."""
    if cfg.name == "soap":
        dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, None: None}
        if cfg.basis_dtype not in dtypes:
            raise ValueError(
                f"optim.basis_dtype={cfg.basis_dtype!r}: expected null, float32, float64 or bfloat16"
            )
        return SOAP(groups, **{**soap_kwargs(cfg), "basis_dtype": dtypes[cfg.basis_dtype]})
    fused = True if device.type == "cuda" else None  # torch's default (foreach) elsewhere
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
    )
