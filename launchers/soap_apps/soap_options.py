"""One mapping from an application's settings to ``soap_dist.SOAP``'s keyword arguments.

Pre-training (``optim.*`` config keys) and fine-tuning (command-line flags) both build SOAP through
``soap_kwargs``, so both pass the same keys, ``SOAP_KEYS``: every SOAP argument an application
sets. The others are left at SOAP's defaults (``data_format``, ``correct_bias``, ``factor_dtype``,
``qr_method``) or decided by the placement (``placement``, ``process_group``, ``device_mesh``).
"""

from __future__ import annotations

from typing import Any

SOAP_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "shampoo_beta",
    "precondition_frequency",
    "max_precond_dim",
    "merge_dims",
    "precondition_1d",
    "normalize_grads",
    "block_size",
    "refresh_delay",
    "fused",
)


def soap_kwargs(
    *,
    lr: float,
    betas: tuple[float, float] | list[float],
    eps: float,
    weight_decay: float,
    shampoo_beta: float,
    precondition_frequency: int,
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
    normalize_grads: bool,
    block_size: int | None,
    refresh_delay: int,
    fused: bool | None,
) -> dict[str, Any]:
    """SOAP's keyword arguments, the keys of ``SOAP_KEYS`` in that order (each one required, so an
    application cannot leave one out)."""
    values = locals()
    kwargs = {key: values[key] for key in SOAP_KEYS}
    kwargs["betas"] = tuple(betas)
    return kwargs
