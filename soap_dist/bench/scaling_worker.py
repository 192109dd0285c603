"""One rank of ``python -m soap_dist.bench.scaling``: build the parameter set, step SOAP, write JSON.

It lives in its own module (not in ``scaling``) so that ``torch.multiprocessing.spawn`` can pickle
the entry point by an importable name even when ``scaling`` runs as ``__main__``. Each rank times
its own steps; a barrier before every step lines the ranks up, so a step's time is what that rank
spent on it (its own work plus waiting on the others inside the collectives).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from soap_dist.bench.param_sets import CONTEXT, MODELS, VOCAB, ParamSpec, gpt2_specs
from soap_dist.bench.timing import sync
from soap_dist.plan import shard_rows

HYPER: dict[str, Any] = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01)
NUMERIC_STATS = (
    "refreshes",
    "factors_refreshed",
    "factors_owned",
    "owned_refresh_cost",
    "bases_installed",
    "refresh_failures",
    "refresh_seconds",
    "owner_seconds",
    "eigh_seconds",
    "factor_bytes",
    "basis_bytes",
    "moment_bytes",
    "bytes_sent",
    "bytes_received",
    "collectives",
)
SAMPLE_STRIDE = 61  # every 61st element of every parameter: a cheap fingerprint to compare runs


def scaled_specs(model: str, layers: int | None, width: int | None, vocab: int | None) -> list[ParamSpec]:
    """GPT-2 shapes from ``param_sets``, optionally narrowed: d -> width (3d, 4d follow), VOCAB -> vocab.

    Narrowing keeps every ratio between the shapes (and so the factor sizes relative to each other),
    which is what the scaling reading needs, while a 2-core CPU can run the whole sweep in minutes.
    """
    d = MODELS[model][0]
    specs = gpt2_specs(model, layers)
    w = d if width is None else width
    v = VOCAB if vocab is None else vocab
    out = []
    for s in specs:
        if s.name == "wte.weight":
            shape: tuple[int, ...] = (v, w)
        elif s.name == "wpe.weight":
            shape = (CONTEXT, w)
        else:
            shape = tuple(n // d * w for n in s.shape)
        out.append(ParamSpec(s.name, shape))
    return out


def _global_params(specs: Sequence[ParamSpec], device: torch.device, seed: int) -> list[Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s.shape, device=device, generator=gen) * 0.02 for s in specs]


def _grads_at(specs: Sequence[ParamSpec], device: torch.device, seed: int, t: int) -> list[Tensor]:
    """The global gradients of call t: the same on every rank and at every world size."""
    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + 7919 * (t + 1))
    return [torch.randn(s.shape, device=device, generator=gen) for s in specs]


class Setup:
    """Parameters laid out for one placement, and how to hand them this rank's part of a gradient."""

    def __init__(self, placement: str, specs: Sequence[ParamSpec], device: torch.device, seed: int) -> None:
        self.placement, self.specs, self.device = placement, specs, device
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        full = _global_params(specs, device, seed)
        if placement in ("fsdp-local", "owner"):  # FSDP2's layout: Shard(0) DTensors
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor

            self.mesh = init_device_mesh(device.type, (self.world,))
            self.params = [torch.nn.Parameter(distribute_tensor(p, self.mesh, [Shard(0)])) for p in full]
        else:
            self.mesh = None
            self.params = [torch.nn.Parameter(p) for p in full]

    def set_grads(self, grads: Sequence[Tensor]) -> None:
        if self.mesh is None:
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            return
        from torch.distributed.tensor import DTensor, Shard

        for p, g in zip(self.params, grads, strict=True):
            start, count = shard_rows(g.shape[0], self.world, self.rank)
            part = g.narrow(0, start, count).contiguous()
            p.grad = DTensor.from_local(
                part, self.mesh, [Shard(0)], run_check=False, shape=g.shape, stride=g.stride()
            )

    def sample(self) -> Tensor:
        """A strided sample of the full parameters (gathered under fsdp-local), in float64."""
        parts = []
        for p in self.params:
            full = p.detach().full_tensor() if self.mesh is not None else p.detach()
            parts.append(full.reshape(-1)[::SAMPLE_STRIDE].double().cpu())
        return torch.cat(parts)


def _numbers(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats.get(k) for k in NUMERIC_STATS} | {
        "placement": stats.get("placement"),
        "world": stats.get("world"),
        "rank": stats.get("rank"),
    }


def _pending_bytes(pending: dict[int, Any]) -> int:
    """Bytes of the engine's stash of refreshed bases waiting to be installed, which stats() leaves out."""
    return sum(t.numel() * t.element_size() for p in pending.values() for t in (p.bases, p.perm, p.ok))


def _timed(step: Callable[[], Any], device: torch.device, barrier: bool) -> float:
    if barrier:
        dist.barrier()
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def run_soap(cfg: dict[str, Any], placement: str, delay: int, device: torch.device) -> dict[str, Any]:
    """First call plus cfg['steps'] steps of soap_dist.SOAP; per-step times and stats snapshots."""
    from soap_dist import SOAP

    specs = cfg["specs"]
    setup = Setup(placement, specs, device, cfg["seed"])
    opt = SOAP(
        setup.params,
        precondition_frequency=cfg["k"],
        max_precond_dim=cfg["max_precond_dim"],
        refresh_delay=delay,
        placement=placement,
        block_size=cfg["block_size"],
        fused=cfg["fused"],
        **HYPER,
    )
    times = []
    after_init: dict[str, Any] = {}
    for t in range(cfg["steps"] + 1):
        setup.set_grads(_grads_at(specs, device, cfg["seed"], t))
        times.append(_timed(opt.step, device, barrier=True))
        if t == 0:
            after_init = _numbers(opt.stats())
    final = _numbers(opt.stats())
    sample = setup.sample()
    pending = getattr(getattr(opt, "_engine", None), "pending", {})
    out = {
        "requested": placement,
        "refresh_delay": delay,
        "init_s": times[0],
        "step_s": times[1:],
        "after_init": after_init,
        "final": final,
        "checksum": float(sample.sum()),
        "pending_bytes": _pending_bytes(pending),
    }
    if dist.get_rank() == 0:
        path = os.path.join(cfg["out_dir"], f"sample_w{dist.get_world_size()}_{placement}_d{delay}.pt")
        torch.save(sample, path)
        out["sample_path"] = path
    del opt, setup
    gc.collect()
    return out


def run_reference(cfg: dict[str, Any], name: str, device: torch.device) -> dict[str, Any]:
    """AdamW or PlainSOAP on one process, same parameters and gradients as the SOAP runs."""
    from soap_dist.bench.plain_soap import PlainSOAP

    specs = cfg["specs"]
    params = [torch.nn.Parameter(p) for p in _global_params(specs, device, cfg["seed"])]
    if name == "adamw":
        cuda = device.type == "cuda"
        opt: Any = torch.optim.AdamW(params, fused=cuda, foreach=not cuda, **HYPER)
    else:
        k, maxd = cfg["k"], cfg["max_precond_dim"]
        opt = PlainSOAP(params, precondition_frequency=k, max_precond_dim=maxd, **HYPER)
    times = []
    for t in range(cfg["steps"] + 1):
        for p, g in zip(params, _grads_at(specs, device, cfg["seed"], t), strict=True):
            p.grad = g
        times.append(_timed(opt.step, device, barrier=False))
    del opt, params
    gc.collect()
    return {"name": name, "init_s": times[0], "step_s": times[1:], "median_s": statistics.median(times[1:])}


def worker(rank: int, world: int, cfg: dict[str, Any]) -> None:
    """Entry point of one spawned rank: join the group, run every (placement, delay), write rank JSON."""
    torch.set_num_threads(cfg["threads"])
    backend = cfg["backend"]
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=cfg["init_method"], rank=rank, world_size=world)
    cfg = dict(cfg, specs=[ParamSpec(name, tuple(shape)) for name, shape in cfg["specs"]])
    result: dict[str, Any] = {"rank": rank, "world": world, "runs": [], "refs": []}
    try:
        for placement in cfg["placements"]:
            for delay in cfg["delays"]:
                if rank == 0:
                    print(f"[world {world}] {placement}, refresh_delay={delay}", flush=True)
                result["runs"].append(run_soap(cfg, placement, delay, device))
        if cfg["references"] and rank == 0:
            for name in ("adamw", "plain"):
                print(f"[world {world}] reference: {name}", flush=True)
                result["refs"].append(run_reference(cfg, name, device))
    finally:
        dist.destroy_process_group()
    with open(os.path.join(cfg["out_dir"], f"w{world}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
