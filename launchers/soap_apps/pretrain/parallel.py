"""Process group, device, model wrapping (FSDP2, DDP, HSDP or none) and gradient clipping.

Nothing here assumes one node: the device comes from LOCAL_RANK, the data slice from RANK and
WORLD_SIZE, and the HSDP shard group defaults to the ranks of one node (LOCAL_WORLD_SIZE, set by
torchrun; LOCAL_SIZE under the deepspeed launcher). Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from soap_apps.pretrain.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank and size, rank and size on its node, and its device."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed() -> DistEnv:
    """Read the launcher's environment, pick the device, and start the process group if world > 1.

    Without torchrun (no WORLD_SIZE) this is one process and no process group is created.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", _env_int("LOCAL_SIZE", world))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistEnv(rank=rank, world=world, local_rank=local_rank, local_world=local_world, device=device)


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op with one process)."""
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of ``value`` over ranks (a copy; ``value`` itself is unchanged)."""
    out = value.detach().clone()
    if env.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= env.world
    return out


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, mode: str, env: DistEnv, hsdp_shard_size: int | None = None) -> nn.Module:
    """``model`` (already on ``env.device``) prepared for data-parallel training under ``mode``.

    fsdp2: ``fully_shard`` on each block of ``model.blocks``, then on the root (embeddings, final norm
    and head); parameters become DTensors ``(Shard(0),)``. hsdp: the same on a 2-D (replicate, shard)
    mesh. ddp: DistributedDataParallel. With one process the model is returned as is, whatever the mode.
    """
    if not env.distributed:
        return model
    if mode == "single":
        raise ConfigError(
            f"parallel.mode='single' needs one process, but WORLD_SIZE={env.world}; use fsdp2, ddp or hsdp, "
            "or run `python launchers/pretrain.py` without torchrun"
        )
    if mode == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mode == "fsdp2":
        mesh = init_device_mesh(env.device.type, (env.world,))
    elif mode == "hsdp":
        shard = hsdp_shard_size or env.local_world
        if env.world % shard:
            raise ConfigError(
                f"parallel.hsdp_shard_size={shard} does not divide the world size {env.world}; set it to a "
                "divisor (usually the number of GPUs per node)"
            )
        mesh = init_device_mesh(
            env.device.type, (env.world // shard, shard), mesh_dim_names=("replicate", "shard")
        )
    else:
        raise ConfigError(f"parallel.mode={mode!r} is not one of fsdp2, ddp, hsdp, single")
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Context for one micro-batch's backward: ``enabled=False`` skips the gradient reduction (the
    gradients accumulate locally) under DDP and FSDP2; the last micro-batch of a step must sync."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        return _fsdp_sync(model, enabled)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(enabled)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients (a plain scalar tensor), after clipping them to ``max_norm``.

    Correct for FSDP2/HSDP: the gradients are DTensors, torch computes each local shard's norm and
    reduces over the mesh (a DTensor total norm, made plain here); tests/test_pretrain_modules.py checks it
    against the unsharded model's norm. With ``max_norm=None`` the gradients are left as they are.
    """
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
