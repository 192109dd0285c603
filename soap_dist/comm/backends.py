"""Which backend serves which device: SOAP's collectives run on the parameters' device, and a group
whose backend cannot serve it fails deep inside the backend at the first collective."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def backend_names(group: dist.ProcessGroup | None) -> dict[str, str] | None:
    """``group``'s backend per device type ("cpu:gloo,cuda:nccl" -> cpu: gloo, cuda: nccl); None when
    torch cannot say."""
    try:
        config = dist.get_backend_config(group)
    except Exception:  # pragma: no cover - an older torch or a custom group
        return None
    names = dict(part.strip().split(":", 1) for part in config.split(",") if ":" in part)
    return {kind.strip(): name.strip() for kind, name in names.items()} or None


def backend_for(group: dist.ProcessGroup | None, device: torch.device) -> str | None:
    """The name of ``group``'s backend for ``device``'s tensors ("nccl", "gloo"); None when unknown."""
    return (backend_names(group) or {}).get(device.type)


def check_backend_serves(groups: Any, device: torch.device) -> None:
    """SOAP's collectives run on the parameters' device: every group's backend must serve it, or
    the first collective fails deep inside the backend. The case met in practice: FSDP2's
    CPUOffloadPolicy puts the shards (and so the optimizer) on the CPU under an NCCL-only group."""
    for name in ("world", "shard", "replicate"):
        group = getattr(groups, name)
        if group is None and name != "world":  # no such group here (None world: the default group)
            continue
        names = backend_names(group)
        if names is not None and device.type not in names:
            config = dist.get_backend_config(group)
            fix = (
                "with FSDP2's CPUOffloadPolicy, create the process group with a CPU backend too: "
                "init_process_group(backend='cpu:gloo,cuda:nccl')"
                if device.type == "cpu"
                else f"create the process group with a backend for {device.type} tensors"
            )
            raise ValueError(
                f"SOAP: the parameters' local tensors are on {device.type}, but the {name} process group's "
                f"backend is '{config}', which has no {device.type} backend, and SOAP's collectives run on "
                f"the parameters' device. Fix: {fix}."
            )
