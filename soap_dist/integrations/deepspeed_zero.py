"""The one file that reads the ZeRO optimizer's internals: its flat partitions.

Under stages 1-3 DeepSpeed calls SOAP with flat fp32 slices that cut through matrices;
``partitioning`` reads, from the ZeRO optimizer, which elements of which parameter each rank's
slice holds, and ``placements.zero`` turns that into whole-row SOAP updates. Those attributes are
internals: the version is pinned (``SUPPORTED_VERSION``) and any other version fails with a
message saying what to do. A SOAP instance given to DeepSpeed some other way (Accelerate, the HF
Trainer) is found by the same means at its first call (``find_zero_optimizer``).
"""

from __future__ import annotations

import sys
from typing import Any

from ..placements.zero import Partitioning
from ..zero_layout import Fragment

SUPPORTED_VERSION = "0.19.8"
ZERO_12 = "DeepSpeedZeroOptimizer"
ZERO_3 = "DeepSpeedZeroOptimizer_Stage3"


def check_version() -> None:
    import deepspeed

    if deepspeed.__version__ != SUPPORTED_VERSION:
        raise RuntimeError(
            f"soap_dist maps DeepSpeed ZeRO partitions through internals of deepspeed=={SUPPORTED_VERSION}, "
            f"but deepspeed {deepspeed.__version__} is installed. Install that version "
            f"(DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed=={SUPPORTED_VERSION}), or use ZeRO "
            "stage 0, where SOAP needs no internals."
        )


# deepspeed 0.19.8's stage-0 fp16 wrappers of a client optimizer: the engine no longer multiplies the
# loss by the loss scale for them, but they still divide the gradients by it
FP16_WRAPPERS = ("FP16_UnfusedOptimizer", "FP16_Optimizer")
FP16_STAGE0 = (
    "fp16 at ZeRO stage 0 is not supported: DeepSpeed {version} does not scale the loss for a client "
    "optimizer there but still unscales its gradients, so SOAP would get gradients divided by the loss "
    'scale. Use bf16 ("bf16": {{"enabled": true}}), or fp16 with zero_optimization.stage 1, 2 or 3'
)


def fp16_stage0_is_broken() -> bool:
    """True for the DeepSpeed version whose stage-0 fp16 path was measured wrong (FP16_STAGE0)."""
    import deepspeed

    return deepspeed.__version__ == SUPPORTED_VERSION


def fp16_stage0_refused(who: str) -> ValueError:
    """The refusal of fp16 at stage 0 (FP16_STAGE0), naming the installed version; ``who`` leads it."""
    import deepspeed

    return ValueError(f"{who}: " + FP16_STAGE0.format(version=deepspeed.__version__))


def zero_optimizer_of(engine: Any) -> Any:
    """The engine's ZeRO stage 1-3 optimizer, or None (stage 0 hands SOAP whole tensors)."""
    opt = getattr(engine, "optimizer", None)
    return opt if type(opt).__name__ in (ZERO_12, ZERO_3) else None


def find_zero_optimizer(soap: Any, depth: int = 12) -> Any:
    """The ZeRO optimizer calling ``soap`` right now, found on the call stack (stages 1-3), else None.

    Accelerate and the HF Trainer call deepspeed.initialize themselves; their SOAP instance meets
    the ZeRO optimizer only when it is called, from the ZeRO optimizer's own methods. A stage-0 fp16
    wrapper is refused here too (FP16_STAGE0): it calls SOAP once inside deepspeed.initialize.
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
        if type(owner).__name__ in FP16_WRAPPERS and getattr(owner, "optimizer", None) is soap:
            import torch

            # the same wrapper serves bf16 at stage 0, with no loss scale: that path is right
            fp16 = getattr(owner, "low_precision_dtype", torch.float16) == torch.float16
            if fp16 and fp16_stage0_is_broken():  # reached through Accelerate or the HF Trainer
                raise fp16_stage0_refused("SOAP under DeepSpeed")
            return None
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
