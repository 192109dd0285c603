"""The optimizer's options: validation with messages that name the argument and its allowed values.

Checked at construction and again at every step (a user may edit a param group between steps).
"""

from __future__ import annotations

import math
from typing import Any

import torch

LAYOUT_KEYS = ("max_precond_dim", "merge_dims", "precondition_1d", "data_format", "block_size")
DATA_FORMATS = ("channels_first", "channels_last")
FACTOR_DTYPES = (torch.float32, torch.float64)


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SOAP: invalid {name}={value!r}; expected {allowed}")


def check_placement(placement: str) -> None:
    """``placement`` is "auto" or a placement a user may force; "zero" gets its own message, since
    docs/design.md names it but only soap_dist.deepspeed picks it."""
    from .plan import PLACEMENTS

    if placement == "zero":
        raise ValueError(
            "SOAP: invalid placement='zero': under DeepSpeed ZeRO 1-3 placement zero is what "
            "placement='auto' runs (soap_dist.deepspeed picks it from the partitions); pass 'auto', "
            "or 'owner' for whole matrices at one rank"
        )
    allowed = "'auto', 'single', 'replicated', 'fsdp-local', 'hsdp' or 'owner'"
    check(placement in ("auto", *PLACEMENTS), "placement", placement, allowed)


def validate_group(group: dict[str, Any]) -> None:
    """Raise a ValueError naming the argument and its allowed range."""
    lr = group["lr"]
    if torch.is_tensor(lr):  # torch.optim accepts a 1-element tensor lr (read with .item() at each step)
        check(lr.numel() == 1 and not lr.requires_grad, "lr", lr, "a number or a 1-element tensor")
        lr = float(lr)
    check(isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr), "lr", lr, "a finite number >= 0")
    betas = group["betas"]
    check(
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
        "betas",
        betas,
        "two numbers in [0, 1)",
    )
    sb = group["shampoo_beta"]
    check(sb < 1.0, "shampoo_beta", sb, "a number < 1 (negative means: use betas[1])")
    check(group["eps"] > 0, "eps", group["eps"], "a number > 0")
    check(group["weight_decay"] >= 0, "weight_decay", group["weight_decay"], "a number >= 0")
    pf = group["precondition_frequency"]
    check(isinstance(pf, int) and pf >= 1, "precondition_frequency", pf, "an integer >= 1")
    mpd = group["max_precond_dim"]
    check(isinstance(mpd, int) and mpd >= 0, "max_precond_dim", mpd, "an integer >= 0")
    df = group["data_format"]
    check(df in DATA_FORMATS, "data_format", df, "'channels_first' or 'channels_last'")
    bs = group["block_size"]
    check(bs is None or (isinstance(bs, int) and bs >= 1), "block_size", bs, "None or an integer >= 1")


def adopt_saved_group(group: dict[str, Any], saved: dict[str, Any]) -> None:
    """Take a saved group's hyperparameters; its layout options must equal ours (state depends on them)."""
    for key in LAYOUT_KEYS:
        if key in saved and saved[key] != group[key]:
            raise ValueError(
                f"SOAP.load_state_dict: saved {key}={saved[key]!r} differs from this optimizer's "
                f"{group[key]!r}; the state layout depends on it"
            )
    group.update({k: v for k, v in saved.items() if k != "params"})  # saved param_names too, as torch
    group["betas"] = tuple(group["betas"])


def check_async_refresh(value: Any, refresh_delay: int) -> None:
    check(value is None or isinstance(value, bool), "async_refresh", value, "None, True or False")
    check(
        not (value and refresh_delay == 0),
        "async_refresh",
        value,
        "None or False with refresh_delay=0 (a refresh running beside the next step is installed "
        "a step late: set refresh_delay=1 to use it)",
    )


def async_refresh_on(value: bool | None, refresh_delay: int, params: list[torch.Tensor]) -> bool:
    """async_refresh resolved: None means on for CUDA parameters when refresh_delay >= 1."""
    if value is not None:
        return value and refresh_delay >= 1
    return refresh_delay >= 1 and bool(params) and params[0].device.type == "cuda"
