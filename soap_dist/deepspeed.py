"""DeepSpeed integration: name SOAP in the JSON config, get correct SOAP at ZeRO stages 0-3.

DeepSpeed cannot name a custom class in its ``"optimizer"`` block, so ``initialize`` takes
deepspeed.initialize's arguments, builds ``soap_dist.SOAP`` from ``{"type": "SOAP", "params":
{...}}``, and hands it over as the client optimizer. Under stages 1-3 DeepSpeed then calls SOAP
with flat fp32 slices that cut through matrices; ``integrations.deepspeed_zero`` (the one module
that reads DeepSpeed internals, pinned to ``SUPPORTED_VERSION``) maps them to parameters, and
``placements.zero`` turns that into whole-row SOAP updates.

A SOAP instance given to DeepSpeed some other way (Accelerate, the HF Trainer) is found by the
same means at its first call: no extra step for the user.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .integrations.deepspeed_zero import (  # noqa: F401  (re-exported: the plugin's public names)
    SUPPORTED_VERSION,
    check_version,
    find_zero_optimizer,
    fp16_stage0_is_broken,
    fp16_stage0_refused,
    partitioning,
    zero_optimizer_of,
)
from .optimizer import SOAP
from .options import as_pair

UNSUPPORTED = {
    "offload_optimizer": "SOAP keeps its state next to the partitions it updates; remove "
    "zero_optimization.offload_optimizer (ZeRO-3, or a larger world, saves the memory instead)",
    "offload_param": "parameter offload is untested with SOAP; remove zero_optimization.offload_param",
    "elastic_checkpoint": "elastic ZeRO checkpoints re-slice optimizer state by element, which "
    "SOAP's row-block state cannot follow; set zero_optimization.elastic_checkpoint to false",
}


def _soap_kwargs() -> set[str]:
    return {n for n in inspect.signature(SOAP.__init__).parameters if n not in ("self", "params")}


# ----- the config plugin -----
def _load_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if isinstance(config, (str, os.PathLike)):
        with open(config) as fh:
            return json.load(fh)
    raise TypeError(
        f"soap_dist.deepspeed.initialize: config must be a dict or a JSON path, got {type(config)}"
    )


JSON_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def soap_from_config(config: dict[str, Any], params: Any) -> tuple[Any, dict[str, Any]]:
    """Build SOAP from a config's ``"optimizer"`` block (type "SOAP"); return it and the config without it.

    Returns (None, config) when the block names another optimizer: DeepSpeed handles those itself.
    """
    block = config.get("optimizer")
    if not isinstance(block, Mapping) or str(block.get("type", "")).lower() != "soap":
        return None, config
    given = block.get("params") or {}
    if not isinstance(given, Mapping):
        raise ValueError(
            f"soap_dist.deepspeed: the optimizer block's \"params\" must be an object of SOAP's options "
            f'(e.g. {{"lr": 3e-3}}), got {given!r}'
        )
    kwargs = dict(given)
    allowed = _soap_kwargs() - {"process_group", "device_mesh"}  # objects: not for a JSON file
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"soap_dist.deepspeed: unknown SOAP params {unknown} in the config's optimizer block; allowed: "
            f"{sorted(allowed)}"
        )
    for key in ("factor_dtype", "basis_dtype"):  # JSON names a dtype as text: "float64", "torch.bfloat16"
        if isinstance(kwargs.get(key), str):
            dtype = JSON_DTYPES.get(kwargs[key].removeprefix("torch."))
            if dtype is None:
                raise ValueError(
                    f"soap_dist.deepspeed: {key}={kwargs[key]!r} in the config's optimizer params; use one "
                    f"of {sorted(JSON_DTYPES)}"
                )
            kwargs[key] = dtype
    if "betas" in kwargs:
        kwargs["betas"] = as_pair(kwargs["betas"])
    rest = {k: v for k, v in config.items() if k != "optimizer"}
    return SOAP(params, **kwargs), rest


# top-level keys the shipped configs/deepspeed/*.json leave "auto" for a launcher to fill
AUTO_FILLED = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
)


def check_config(config: dict[str, Any]) -> None:
    """Refuse, at start, the ZeRO options SOAP does not support, saying what to use instead."""
    zero = config.get("zero_optimization", {}) or {}
    for key, why in UNSUPPORTED.items():
        value = zero.get(key)
        if isinstance(value, Mapping):
            value = str(value.get("device", "none")).lower() not in ("none", "")
        if value:
            raise ValueError(f"soap_dist.deepspeed: zero_optimization.{key} is not supported: {why}")
    unresolved = [k for k in AUTO_FILLED if config.get(k) == "auto"]
    if unresolved:
        raise ValueError(
            f'soap_dist.deepspeed: {", ".join(unresolved)} = "auto" in the config; DeepSpeed itself does '
            'not resolve "auto" (the pre-training launcher and Accelerate fill these in): give numbers '
            "when calling initialize yourself"
        )
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3, "0", "1", "2", "3"):
        raise ValueError(f"soap_dist.deepspeed: zero_optimization.stage={stage!r}; expected 0, 1, 2 or 3")
    if int(stage) > 0:
        check_version()


# placements that fit what each stage hands SOAP: whole replicated tensors (0), flat partitions (1-3,
# where "auto" runs placement zero)
STAGE_PLACEMENTS = {0: ("auto", "replicated", "single"), 1: ("auto", "owner")}


def check_soap_setup(config: dict[str, Any], soap: SOAP) -> None:
    """Refuse, at start, SOAP settings that cannot work at the config's ZeRO stage, naming the fix.

    Each of these otherwise fails late or, for fp16 at stage 0, trains wrongly without a word.
    """
    zero = config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage == 0 and fp16_stage0_is_broken():
        from deepspeed.runtime.precision_config import get_float16_config

        if get_float16_config(config).enabled:  # DeepSpeed's own reading ("auto" and "false": off)
            raise fp16_stage0_refused("soap_dist.deepspeed")
    allowed = STAGE_PLACEMENTS[min(stage, 1)]
    if soap.placement not in allowed:
        hands = "whole replicated tensors" if stage == 0 else "flat partitions of the parameters"
        raise ValueError(
            f"soap_dist.deepspeed: SOAP placement={soap.placement!r} does not fit ZeRO stage {stage}, which "
            f'hands the optimizer {hands}; use one of {list(allowed)} ("auto" picks for you)'
            + (', or stage 1-3 for "owner"' if stage == 0 and soap.placement == "owner" else "")
        )
    if stage in (1, 2):  # deepspeed 0.19.8 reads the first parameter of every group it keeps
        for index, group in enumerate(soap.param_groups):
            if group["params"] and not any(p.requires_grad for p in group["params"]):  # empty: dropped
                raise ValueError(
                    f"soap_dist.deepspeed: param group {index} holds no trainable parameter (all have "
                    f"requires_grad=False); DeepSpeed ZeRO stage {stage} fails on such a group (IndexError "
                    "in its partitioning). Leave the group out of model_parameters, or make one of its "
                    "parameters trainable"
                )


def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """deepspeed.initialize, with ``"optimizer": {"type": "SOAP", "params": {...}}`` understood.

    Same arguments and return value as deepspeed.initialize. The config may come as ``config``,
    ``config_params`` or ``args.deepspeed_config``. ``zero_allow_untested_optimizer`` is set for
    you; unknown SOAP params and unsupported ZeRO options fail here, before any work.
    """
    import deepspeed

    bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs)
    call = dict(bound.arguments)
    key = "config" if call.get("config") is not None else "config_params"
    source = call.get(key)
    ds_args = call.get("args")
    if source is None and getattr(ds_args, "deepspeed_config", None):
        source = ds_args.deepspeed_config
        ds_args = copy.copy(ds_args)
        ds_args.deepspeed_config = None  # deepspeed refuses a config given twice
        call["args"] = ds_args
    config = _load_config(source)
    check_config(config)
    params = call.get("model_parameters")
    if params is None and call.get("model") is not None:
        params = [p for p in call["model"].parameters() if p.requires_grad]
    optimizer, config = soap_from_config(config, params) if params is not None else (None, config)
    if optimizer is not None:
        if call.get("optimizer") is not None:
            raise ValueError(
                "soap_dist.deepspeed.initialize: both an optimizer argument and a SOAP optimizer block in "
                "the config; keep one"
            )
        call["optimizer"] = optimizer
        call.pop("model_parameters", None)  # the client optimizer already has them, grouped
        config["zero_allow_untested_optimizer"] = True
    if isinstance(call.get("optimizer"), SOAP):
        check_soap_setup(config, call["optimizer"])
    call.pop("config_params", None)
    call["config"] = config
    disable_shm_comm()
    with _without_untested_banner() if optimizer is not None else contextlib.nullcontext():
        engine, opt, loader, scheduler = deepspeed.initialize(**call)
    if optimizer is not None:
        optimizer.bind_zero(zero_optimizer_of(engine))
    return engine, opt, loader, scheduler


class _DropUntested(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


@contextlib.contextmanager
def _without_untested_banner() -> Iterator[None]:
    """DeepSpeed logs "You are using ZeRO with an untested optimizer" for any client optimizer, even
    with zero_allow_untested_optimizer set; SOAP under ZeRO is tested here (tests/test_deepspeed.py),
    so that one message is dropped during initialize, and nothing else."""
    logger, drop = logging.getLogger("DeepSpeed"), _DropUntested()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def disable_shm_comm() -> None:
    """Skip DeepSpeed's one-time shm-op JIT build on CPU (~36 s; it only serves inference all-reduce)."""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other versions
        pass
