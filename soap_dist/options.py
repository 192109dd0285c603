"""The optimizer's options: validation with messages that name the argument and its allowed values.

Checked at construction and again at every step (a user may edit a param group between steps).
"""

from __future__ import annotations

import difflib
import math
import numbers
import warnings
from typing import Any

import torch

from .comm.guard import DEFAULT_TIMEOUT_S
from .idle import callers_level

LAYOUT_KEYS = ("max_precond_dim", "merge_dims", "precondition_1d", "data_format", "block_size")
DATA_FORMATS = ("channels_first", "channels_last")
FACTOR_DTYPES = (torch.float32, torch.float64)


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        parts = value if isinstance(value, (tuple, list)) else (value,)
        grad = any(torch.is_tensor(v) and v.requires_grad for v in parts)  # else in range, yet refused
        hint = " (a tensor that requires grad: .detach() it)" if grad else ""
        raise ValueError(f"SOAP: invalid {name}={value!r}; expected {allowed}{hint}")


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


BOOL_KEYS = ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias")
# SOAP's keyword-only options that hold for the whole optimizer, with their defaults: what a copy of
# the optimizer carries (optimizer_state) and what a param group may not set (check_group_keys)
WHOLE_OPTIMIZER_DEFAULTS: dict[str, Any] = dict(
    refresh_delay=0,
    factor_dtype=torch.float32,
    qr_method="auto",
    fused=None,
    placement="auto",
    process_group=None,
    device_mesh=None,
    collective_timeout=DEFAULT_TIMEOUT_S,
    refresh_schedule="all",
    basis_dtype=None,
    async_refresh=None,
    owner_scope="world",
)


GROUP_KEYS = (
    "lr", "betas", "shampoo_beta", "eps", "weight_decay", "precondition_frequency", *LAYOUT_KEYS,
    "normalize_grads", "correct_bias",
)  # fmt: skip
ALIASES = {"learning_rate": "lr", "beta1": "betas", "beta2": "betas", "wd": "weight_decay"}


def check_group_keys(group: dict[str, Any]) -> None:
    """A whole-optimizer option given in a param group would be ignored there: say where it goes."""
    for key in WHOLE_OPTIMIZER_DEFAULTS:
        if key in group:
            raise ValueError(
                f"SOAP: {key!r} in a param group has no effect: it holds for the whole optimizer; pass "
                f"SOAP(..., {key}=...) instead"
            )


def warn_misspelt_group_keys(group: dict[str, Any]) -> None:
    """A key close to one of SOAP's is most likely misspelt, and would be ignored silently (other keys
    are left alone: schedulers and frameworks keep their own in param groups, e.g. initial_lr)."""
    for key in group:
        if not isinstance(key, str) or key in GROUP_KEYS or key in ("params", "param_names"):
            continue
        near = ALIASES.get(key) or next(iter(difflib.get_close_matches(key, GROUP_KEYS, 1, 0.8)), None)
        if near is not None:
            warnings.warn(
                f"SOAP: param group key {key!r} is not an option of SOAP and has no effect; did you mean "
                f"{near!r}?",
                stacklevel=callers_level(),
            )


def is_number(x: Any) -> bool:
    """A real number (numpy's too, or a 1-element tensor without requires_grad: one read at each step
    would warn each time), never a bool: True would pass as 1."""
    if torch.is_tensor(x):
        return x.numel() == 1 and not x.is_complex() and not x.requires_grad
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def as_pair(betas: Any) -> Any:
    """betas as a tuple when it is a sequence; anything else is left for validate_group to name."""
    return tuple(betas) if isinstance(betas, (tuple, list)) else betas


def is_integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


MAX_LR = 1e30
INTEGER = "(a Python int: pass int(value) for a numpy one)"


def validate_group(group: dict[str, Any], refresh_delay: int | None = None) -> None:
    """Raise a ValueError naming the argument and its allowed range (types first, so a string or a
    bool gets this message, not Python's). ``refresh_delay``: also check it against the group's
    precondition_frequency, which a user may edit or a checkpoint bring."""
    check_group_keys(group)  # also a whole-optimizer key set between steps (param_groups[0]["placement"])
    lr = group["lr"]
    if torch.is_tensor(lr):  # torch.optim accepts a 1-element tensor lr (read with .item() at each step)
        check(
            lr.numel() == 1 and not lr.requires_grad and not lr.is_complex(),
            "lr",
            lr,
            "a number or a real 1-element tensor without requires_grad (pass lr.detach())",
        )
        lr = float(lr)
    check(
        is_number(lr) and 0 <= lr < MAX_LR,
        "lr",
        lr,
        f"a finite number >= 0 and below {MAX_LR:g} (larger ones overflow the float32 step size)",
    )
    betas = group["betas"]
    check(
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(is_number(b) and 0.0 <= b < 1.0 for b in betas),
        "betas",
        betas,
        "two numbers in [0, 1)",
    )
    sb = group["shampoo_beta"]
    check(is_number(sb) and sb < 1.0, "shampoo_beta", sb, "a number < 1 (negative means: use betas[1])")
    eps = group["eps"]
    check(is_number(eps) and math.isfinite(eps) and eps > 0, "eps", eps, "a finite number > 0")
    wd = group["weight_decay"]
    check(is_number(wd) and math.isfinite(wd) and wd >= 0, "weight_decay", wd, "a finite number >= 0")
    pf = group["precondition_frequency"]
    check(is_integer(pf) and pf >= 1, "precondition_frequency", pf, f"an integer >= 1 {INTEGER}")
    mpd = group["max_precond_dim"]
    check(is_integer(mpd) and mpd >= 0, "max_precond_dim", mpd, f"an integer >= 0 {INTEGER}")
    for key in BOOL_KEYS:
        check(isinstance(group[key], bool), key, group[key], "True or False (a Python bool)")
    df = group["data_format"]
    check(df in DATA_FORMATS, "data_format", df, "'channels_first' or 'channels_last'")
    bs = group["block_size"]
    check(bs is None or (is_integer(bs) and bs >= 1), "block_size", bs, f"None or an integer >= 1 {INTEGER}")
    if refresh_delay is not None:
        check(
            refresh_delay < pf,
            "refresh_delay",
            refresh_delay,
            f"an integer < precondition_frequency ({pf}, this param group's): a basis installed after the "
            "next refresh would never be used",
        )


def validate_stepped_group(group: dict[str, Any], index: int, refresh_delay: int | None) -> None:
    """``validate_group`` at a step, naming the group: its values may have been edited since it was
    added (``param_groups[i]["lr"] = ...``, a scheduler), and the message says which one."""
    try:
        validate_group(group, refresh_delay)
    except ValueError as error:
        raise ValueError(str(error).replace("SOAP: ", f"SOAP: param_groups[{index}]: ", 1)) from None


def check_layout_unchanged(groups: list[dict[str, Any]], built: list[tuple] | None) -> list[tuple]:
    """The layout options of every group, checked against those the state was built with: the factors'
    shapes follow them, so an edit after the first step would be ignored (and saved beside state of
    the old layout). Returns the current ones."""
    now = [tuple(g[k] for k in LAYOUT_KEYS) for g in groups]
    for g, (old, new) in enumerate(zip(built or [], now, strict=False)):
        for key, a, b in zip(LAYOUT_KEYS, old, new, strict=True):
            if a != b:
                raise ValueError(
                    f"SOAP: param_groups[{g}]['{key}'] changed from {a!r} to {b!r} after the optimizer "
                    "state was built; the factors' layout is fixed then. Build a new SOAP with the new "
                    f"value (state_dict() of this one will not load into it), or set {key} back."
                )
    return now


def adopt_saved_group(group: dict[str, Any], saved: dict[str, Any], refresh_delay: int) -> None:
    """Take a saved group's hyperparameters; its layout options must equal ours (state depends on them),
    and the result must be valid here (checked before anything changes)."""
    for key in LAYOUT_KEYS:
        if key in saved and saved[key] != group[key]:
            raise ValueError(
                f"SOAP.load_state_dict: saved {key}={saved[key]!r} differs from this optimizer's "
                f"{group[key]!r}; the state layout depends on it"
            )
    # saved param_names too; not another optimizer's whole-optimizer keys (AdamW's groups hold "fused"):
    # such a state is named as foreign by the shape check that follows
    kept = {k: v for k, v in saved.items() if k != "params" and k not in WHOLE_OPTIMIZER_DEFAULTS}
    merged = {**group, **kept}
    merged["betas"] = as_pair(merged["betas"])
    try:
        validate_group(merged, refresh_delay)
    except ValueError as error:
        raise ValueError(
            f"SOAP.load_state_dict: a saved param group does not fit this optimizer: {error}"
        ) from None
    group.update(merged)


def check_groups_and_mesh(process_group: Any, device_mesh: Any) -> None:
    """Types only (the groups need not be initialized yet): a wrong one failed deep in torch at step 1."""
    import torch.distributed as dist

    if not dist.is_available():
        return
    if process_group is not None:
        check(
            isinstance(process_group, dist.ProcessGroup),
            "process_group",
            process_group,
            "None or a torch.distributed ProcessGroup (e.g. dist.new_group(...))",
        )
    if device_mesh is not None:
        from torch.distributed.device_mesh import DeviceMesh

        check(
            isinstance(device_mesh, DeviceMesh),
            "device_mesh",
            device_mesh,
            "None or a DeviceMesh (torch.distributed.device_mesh.init_device_mesh)",
        )


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
