"""DeepSpeed integration: name SOAP in the JSON config, get correct SOAP at ZeRO stages 0-3.

DeepSpeed cannot name a custom class in its ``"optimizer"`` block, so ``initialize`` takes
deepspeed.initialize's arguments, builds ``soap_dist.SOAP`` from ``{"type": "SOAP", "params":
{...}}``, and hands it over as the client optimizer. Under stages 1-3 DeepSpeed then calls SOAP
with flat fp32 slices that cut through matrices; ``partitioning`` reads, from the ZeRO optimizer,
which elements of which parameter each rank's slice holds, and ``soap_dist.zero_runner`` turns
that into whole-row SOAP updates. Those attributes are DeepSpeed internals: the version is
pinned (``SUPPORTED_VERSION``) and any other version fails with a message saying what to do.

A SOAP instance given to DeepSpeed some other way (Accelerate, the HF Trainer) is found by the
same means at its first call: no extra step for the user.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from .zero_layout import Fragment
from .zero_runner import Partitioning

SUPPORTED_VERSION = "0.19.8"
ZERO_12 = "DeepSpeedZeroOptimizer"
ZERO_3 = "DeepSpeedZeroOptimizer_Stage3"
UNSUPPORTED = {
    "offload_optimizer": "SOAP keeps its state next to the partitions it updates; remove "
    "zero_optimization.offload_optimizer (ZeRO-3, or a larger world, saves the memory instead)",
    "offload_param": "parameter offload is untested with SOAP; remove zero_optimization.offload_param",
    "elastic_checkpoint": "elastic ZeRO checkpoints re-slice optimizer state by element, which "
    "SOAP's row-block state cannot follow; set zero_optimization.elastic_checkpoint to false",
}


def _soap_kwargs() -> set[str]:
    from .optimizer import SOAP

    return {n for n in inspect.signature(SOAP.__init__).parameters if n not in ("self", "params")}


def check_version() -> None:
    import deepspeed

    if deepspeed.__version__ != SUPPORTED_VERSION:
        raise RuntimeError(
            f"soap_dist maps DeepSpeed ZeRO partitions through internals of deepspeed=={SUPPORTED_VERSION}, "
            f"but deepspeed {deepspeed.__version__} is installed. Install that version "
            f"(DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed=={SUPPORTED_VERSION}), or use ZeRO "
            "stage 0, where SOAP needs no internals."
        )


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


def soap_from_config(config: dict[str, Any], params: Any) -> tuple[Any, dict[str, Any]]:
    """Build SOAP from a config's ``"optimizer"`` block (type "SOAP"); return it and the config without it.

    Returns (None, config) when the block names another optimizer: DeepSpeed handles those itself.
    """
    from .optimizer import SOAP

    block = config.get("optimizer")
    if not isinstance(block, Mapping) or str(block.get("type", "")).lower() != "soap":
        return None, config
    kwargs = dict(block.get("params", {}))
    unknown = sorted(set(kwargs) - _soap_kwargs())
    if unknown:
        raise ValueError(
            f"soap_dist.deepspeed: unknown SOAP params {unknown} in the config's optimizer block; allowed: "
            f"{sorted(_soap_kwargs())}"
        )
    if isinstance(kwargs.get("factor_dtype"), str):
        kwargs["factor_dtype"] = getattr(torch, kwargs["factor_dtype"].replace("torch.", ""))
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    rest = {k: v for k, v in config.items() if k != "optimizer"}
    return SOAP(params, **kwargs), rest


def check_config(config: dict[str, Any]) -> None:
    """Refuse, at start, the ZeRO options SOAP does not support, saying what to use instead."""
    zero = config.get("zero_optimization", {}) or {}
    for key, why in UNSUPPORTED.items():
        value = zero.get(key)
        if isinstance(value, Mapping):
            value = str(value.get("device", "none")).lower() not in ("none", "")
        if value:
            raise ValueError(f"soap_dist.deepspeed: zero_optimization.{key} is not supported: {why}")
    if int(zero.get("stage", 0)) > 0:
        check_version()


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
    call.pop("config_params", None)
    call["config"] = config
    disable_shm_comm()
    engine, opt, loader, scheduler = deepspeed.initialize(**call)
    if optimizer is not None:
        optimizer.bind_zero(zero_optimizer_of(engine))
    return engine, opt, loader, scheduler


def disable_shm_comm() -> None:
    """Skip DeepSpeed's one-time shm-op JIT build on CPU (~36 s; it only serves inference all-reduce)."""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other versions
        pass


# ----- reading the ZeRO optimizer (pinned internals) -----
def zero_optimizer_of(engine: Any) -> Any:
    """The engine's ZeRO stage 1-3 optimizer, or None (stage 0 hands SOAP whole tensors)."""
    opt = getattr(engine, "optimizer", None)
    return opt if type(opt).__name__ in (ZERO_12, ZERO_3) else None


def find_zero_optimizer(soap: Any, depth: int = 12) -> Any:
    """The ZeRO optimizer calling ``soap`` right now, found on the call stack (stages 1-3), else None.

    Accelerate and the HF Trainer call deepspeed.initialize themselves; their SOAP instance meets
    the ZeRO optimizer only when it is called, from the ZeRO optimizer's own methods.
    """
    if "deepspeed" not in sys.modules:
        return None
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if type(owner).__name__ in (ZERO_12, ZERO_3) and getattr(owner, "optimizer", None) is soap:
            return owner
        frame = frame.f_back
    return None


def partitioning(zero: Any) -> Partitioning:
    """Which elements of which parameter every rank's flat slice holds (stages 1-3)."""
    import torch.distributed as dist

    check_version()
    names_of = getattr(zero, "param_names", {}) or {}
    if type(zero).__name__ == ZERO_12:
        return _stage12(zero, names_of, dist)
    return _stage3(zero, names_of, dist)


def _group_info(group: Any, dist: Any) -> tuple[int, int, list[int]]:
    return dist.get_world_size(group=group), dist.get_rank(group=group), dist.get_process_group_ranks(group)


def _stage12(zero: Any, names_of: dict, dist: Any) -> Partitioning:
    groups = list(zero.real_dp_process_group)
    world, rank, ranks = _group_info(groups[0], dist)
    for g in groups[1:]:
        if _group_info(g, dist) != (world, rank, ranks):
            raise ValueError(
                "soap_dist.deepspeed: param groups with different data-parallel groups are not supported"
            )
    shapes, names, param_flat = [], [], []
    fragments: list[list[Fragment]] = [[] for _ in range(world)]
    for i, params in enumerate(zero.round_robin_bit16_groups):
        size = int(zero.partition_size[i])
        for p, offset in zip(params, zero.round_robin_bit16_offsets[i], strict=True):
            index = len(shapes)
            shapes.append(tuple(p.shape))
            names.append(names_of.get(p) or f"param_groups[{i}] parameter {index}")
            param_flat.append(i)
            n = p.numel()
            for r in range(world):
                lo, hi = max(offset, r * size), min(offset + n, (r + 1) * size)
                if hi > lo:
                    fragments[r].append(Fragment(index, lo - offset, hi - lo, lo - r * size))
    flats = list(zero.single_partition_of_fp32_groups)
    return Partitioning(
        world, rank, groups[0], ranks, flats, list(range(len(flats))), shapes, names, param_flat, fragments
    )


def _stage3(zero: Any, names_of: dict, dist: Any) -> Partitioning:
    world, rank, ranks = _group_info(zero.dp_process_group, dist)
    shapes, names, param_flat, flat_group = [], [], [], []
    fragments: list[list[Fragment]] = [[] for _ in range(world)]
    for j, params in enumerate(zero.fp16_groups):
        flat_group.append(int(zero.sub_group_to_group_id[j]))
        for p in params:
            index = len(shapes)
            shapes.append(tuple(p.ds_shape))
            names.append(names_of.get(p) or f"sub_group[{j}] parameter {index}")
            param_flat.append(j)
            _, offset, per_rank = zero.grad_position[zero.get_param_id(p)]
            total = int(p.ds_numel)
            for r in range(world):
                start = r * per_rank
                n = max(0, min(per_rank, total - start))
                if n:
                    fragments[r].append(Fragment(index, start, n, int(offset)))
    flats = list(zero.fp32_partitioned_groups_flat)
    return Partitioning(
        world, rank, zero.dp_process_group, ranks, flats, flat_group, shapes, names, param_flat, fragments
    )
