"""Multi-rank scenarios, run inside one spawned gloo group per world size (start-up is the cost).

Each scenario runs on every rank and returns a dict of plain numbers/strings; the tests assert on
them. References are one-process SOAP runs on the same global batch, computed in the worker.
"""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from soap_dist import SOAP

F64 = dict(factor_dtype=torch.float64, fused=False, qr_method="householder")
# Full-rank column factors (rows >= columns) so eigenvectors are unique; (17, 6) does not divide
# by 2 or 4, (3, 2) is smaller than world 4, (30, 6) is an "embedding" whose 30 rows exceed
# max_precond_dim=20 (no row factor), (6,) a bias/LayerNorm vector (AdamW path).
# Two (5, 5) matrices share a stack while their factors have different owners under replicated.
SHAPES = [(17, 6), (3, 2), (30, 6), (6,), (16, 4), (5, 5), (5, 5)]
COMMON = dict(lr=0.02, precondition_frequency=3, max_precond_dim=20, weight_decay=0.01, **F64)
STEPS = 12


def _inits(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes] for _ in range(steps)]


def one_process(shapes=SHAPES, steps=STEPS, **kw):
    params = [torch.nn.Parameter(w.clone()) for w in _inits(shapes)]
    opt = SOAP(params, **{**COMMON, **kw})
    for gs in _grads(shapes, steps):
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _rel(a, b) -> float:
    return max(((x - y).norm() / y.norm().clamp_min(1e-300)).item() for x, y in zip(a, b, strict=True))


def _distributed(mesh, placements, shapes=SHAPES, steps=STEPS, opt_hook=None, **kw):
    """SOAP on DTensors (what fully_shard hands an optimizer), or plain tensors when mesh is None."""

    def make(t):
        return t.clone() if mesh is None else distribute_tensor(t.clone(), mesh, placements)

    params = [torch.nn.Parameter(make(w)) for w in _inits(shapes)]
    opt = SOAP(params, **{**COMMON, **kw})
    if opt_hook:
        opt_hook(opt)
    for gs in _grads(shapes, steps):
        for p, g in zip(params, gs, strict=True):
            p.grad = make(g)
        opt.step()
    full = [p.detach().full_tensor() if mesh is not None else p.detach().clone() for p in params]
    return full, opt


# ----- scenarios -----
def _same_on_every_rank(tensors) -> bool:
    mine = torch.cat([t.reshape(-1).double() for t in tensors])
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return all(torch.equal(everyone[0], t) for t in everyone)


def replicated(world):
    got, opt = _distributed(None, None)
    want = one_process()
    stats = opt.stats()
    # float32 as well: replicas must stay bitwise identical (they drift apart otherwise)
    got32, _ = _distributed(None, None, factor_dtype=torch.float32, fused=None)
    _, single = _distributed(None, None, placement="single")
    # the asynchronous refresh (inline on CPU): reduce at the launch, broadcasts at the next step
    delayed_sync, _ = _distributed(None, None, refresh_delay=1, async_refresh=False)
    delayed_async, _ = _distributed(None, None, refresh_delay=1, async_refresh=True)
    return {
        "async_bitwise": all(torch.equal(a, b) for a, b in zip(delayed_sync, delayed_async, strict=True)),
        "async_rel": _rel(delayed_async, one_process(refresh_delay=1)),
        "placement": stats["placement"],
        "max_abs_diff": max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)),
        "rel": _rel(got, want),
        "replicas_equal": _same_on_every_rank(got),
        "replicas_equal_f32": _same_on_every_rank(got32),
        "owned": stats["factors_owned"],
        "sent": stats["bytes_sent"],
        "factor_bytes": stats["factor_bytes"],
        "single_factor_bytes": single.stats()["factor_bytes"],
    }


def unsupported(world):
    """Shard(1) (what tensor parallel or shard_placement_fn gives) and mixed DTensor/plain fail clearly."""
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    cases = {
        "shard1": [torch.nn.Parameter(distribute_tensor(torch.randn(4, 8), mesh, [Shard(1)]))],
        "mixed": [
            torch.nn.Parameter(distribute_tensor(torch.randn(4, 8), mesh, [Shard(0)])),
            torch.nn.Parameter(torch.randn(4, 8)),
        ],
    }
    for name, params in cases.items():
        for p in params:
            p.grad = torch.zeros_like(p)
        try:
            SOAP(params).step()
            out[name] = ""
        except ValueError as error:
            out[name] = str(error)
    return out


def nonfinite_shard(world):
    """A NaN in one rank's shard skips the whole parameter on every rank, as in one process."""
    mesh = init_device_mesh("cpu", (world,))
    shapes = [(16, 6), (8, 4)]
    params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in _inits(shapes)]
    reference = [torch.nn.Parameter(w.clone()) for w in _inits(shapes)]
    opt = SOAP(params, **COMMON, block_size=1, placement="fsdp-local")
    ref = SOAP(reference, **COMMON, block_size=1)
    for step, gs in enumerate(_grads(shapes, 8)):
        if step == 4:
            gs[0][-1, 0] = float("nan")  # the last rank's rows only
        for p, r, g in zip(params, reference, gs, strict=True):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            r.grad = g.clone()
        opt.step()
        ref.step()
    got = [p.detach().full_tensor() for p in params]
    return {
        "rel": _rel(got, [r.detach() for r in reference]),
        "finite": all(torch.isfinite(g).all() for g in got),
    }


def explicit_group(world):
    """Two independent replicated pairs inside one world, through process_group= and device_mesh=."""
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    got, opt = _distributed(None, None, process_group=pairs[rank // 2])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pair", "member"))
    by_mesh, opt_mesh = _distributed(None, None, device_mesh=mesh["member"])
    want = one_process()
    return {
        "world": opt.stats()["world"],
        "mesh_world": opt_mesh.stats()["world"],
        "rel": _rel(got, want),
        "mesh_rel": _rel(by_mesh, want),
    }


def ddp_model(world):
    """A real DDP model: each rank its slice of the global batch; DDP averages the gradients."""
    torch.manual_seed(0)  # square layers and a batch >= width: every factor is full rank
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)

    def build():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6)).double()

    def train(model, xs, ys):
        opt = SOAP(model.parameters(), **COMMON)
        for _ in range(7):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    rank = dist.get_rank()
    chunk = 8 // world
    ddp = torch.nn.parallel.DistributedDataParallel(build())
    got, opt = train(ddp, x[rank * chunk : (rank + 1) * chunk], y[rank * chunk : (rank + 1) * chunk])
    want, _ = train(build(), x, y)
    return {"placement": opt.stats()["placement"], "rel": _rel(got, want)}


def fsdp_aligned(world):
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for block in (1, 2):
        shapes = SHAPES if block == 1 else [(16, 6), (8, 4), (8,)]
        got, opt = _distributed(mesh, [Shard(0)], shapes=shapes, block_size=block, placement="fsdp-local")
        want = one_process(shapes=shapes, block_size=block)
        out[f"rel_b{block}"] = _rel(got, want)
        out["placement"] = opt.stats()["placement"]
    return out


def fsdp_unblocked(world):
    """block_size=None: the row blocks are the shards, so the result depends on the world size."""
    mesh = init_device_mesh("cpu", (world,))
    shapes = [(16, 12), (16, 10)]  # a shard's rows <= columns <= all rows: every factor full rank
    got, _ = _distributed(mesh, [Shard(0)], shapes=shapes, block_size=None, placement="fsdp-local")
    return {
        "rel_to_shard_blocks": _rel(got, one_process(shapes=shapes, block_size=16 // world)),
        "rel_to_unblocked": _rel(got, one_process(shapes=shapes, block_size=None)),
    }


def hsdp(world):
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for block in (1, None):
        got, opt = _distributed(mesh, [Replicate(), Shard(0)], block_size=block, placement="hsdp")
        fsdp_got, _ = _distributed(mesh["shard"], [Shard(0)], block_size=block, placement="fsdp-local")
        out[f"rel_b{block}"] = _rel(got, fsdp_got)
        out["placement"] = opt.stats()["placement"]
    # The replicas wait on different statistics reduces (a column factor's, in its owner's replica
    # only), here as many as 24 against 18: state_dict()'s rendezvous must not count them.
    shapes = [(8, 8), (8,), (16, 8), (16,)]
    _, opt = _distributed(
        mesh,
        [Replicate(), Shard(0)],
        shapes=shapes,
        steps=7,
        block_size=2,
        placement="hsdp",
        collective_timeout=60,
    )
    try:
        out["saved"] = len(opt.state_dict()["state"])
    except Exception as error:  # reported to the test
        out["saved"] = repr(error)
    return out


def delayed(world):
    """refresh_delay=1 on a least-squares problem: reproducible, installed at t + 2, loss close to 0's."""
    gen = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(64, 10, generator=gen, dtype=torch.float64),
        torch.randn(64, 6, generator=gen, dtype=torch.float64),
    )
    mesh = init_device_mesh("cpu", (world,))

    def run(delay, async_refresh=None):
        w = torch.nn.Parameter(distribute_tensor(torch.zeros(10, 6, dtype=torch.float64), mesh, [Shard(0)]))
        opt = SOAP(
            [w],
            **{**COMMON, "lr": 0.05, "block_size": 1},
            refresh_delay=delay,
            placement="fsdp-local",
            async_refresh=async_refresh,
        )
        losses = []
        for _ in range(15):
            full = w.detach().full_tensor().requires_grad_()
            loss = ((x @ full - y) ** 2).mean()
            loss.backward()
            w.grad = distribute_tensor(full.grad, mesh, [Shard(0)])
            opt.step()
            losses.append(loss.item())
        return w.detach().full_tensor(), losses, opt.stats()

    a, loss_a, stats_a = run(1)
    b, _, _ = run(1)
    c, _, stats_c = run(1, async_refresh=True)
    _, loss_0, _ = run(0)
    return {
        "bitwise": bool(torch.equal(a, b)),
        "async_bitwise": bool(torch.equal(a, c)) and stats_c["installed_at"] == stats_a["installed_at"],
        "installed_at": stats_a["installed_at"],
        "loss_delay1": loss_a[-1],
        "loss_delay0": loss_0[-1],
    }


def plan_mismatch(world):
    shapes = [(8, 4), (6, 3)] if dist.get_rank() == 0 else [(8, 4), (6, 4)]
    params = [torch.nn.Parameter(w) for w in _inits(shapes)]
    opt = SOAP(params, **COMMON)
    for p in params:
        p.grad = torch.ones_like(p)
    try:
        opt.step()
    except RuntimeError as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return {"error": ""}


def refresh_failure(world):
    """Every refresh on rank 0 fails: no rank hangs and every rank keeps rank 0's factors' old bases."""
    import soap_dist.linalg as linalg

    real = linalg.power_iteration_refresh
    rank = dist.get_rank()

    def broken(factors, bases, qr_method, **kw):
        q, perm, ok = real(factors, bases, qr_method, **kw)
        return torch.full_like(q, float("nan")), perm, torch.zeros_like(ok)

    if rank == 0:
        linalg.power_iteration_refresh = broken
    try:
        before = None
        shapes = [(8, 4), (6, 3), (5, 5)]
        params = [torch.nn.Parameter(w.clone()) for w in _inits(shapes)]
        opt = SOAP(params, **COMMON)
        for step, gs in enumerate(_grads(shapes, 5)):
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
            if step == 0:
                before = {k: v.clone() for k, v in _bases(opt).items()}
        after = _bases(opt)
        owners = {(e.param, e.dim): e.owner for e in opt._engine.plan.entries}
        kept = [key for key in after if owners[key] == 0 and torch.equal(after[key], before[key])]
        moved = [key for key in after if owners[key] != 0 and not torch.equal(after[key], before[key])]
        finite = all(torch.isfinite(v).all() for v in after.values())
        same_everywhere = _same_on_every_rank([p.detach() for p in params])
        return {
            "owned_by_0": sum(1 for v in owners.values() if v == 0),
            "kept": len(kept),
            "moved": len(moved),
            "others": sum(1 for v in owners.values() if v != 0),
            "finite": finite,
            "same_params_everywhere": same_everywhere,
            "failures": opt.stats()["refresh_failures"],
        }
    finally:
        linalg.power_iteration_refresh = real


def _bases(opt):
    state = opt.state_dict()["state"]
    return {
        (i, int(k.split("_")[1])): v
        for i, entry in state.items()
        for k, v in entry.items()
        if k.startswith("basis_")
    }


def checkpoint(world, directory):
    """FSDP2 fully_shard model, DCP save at world 2 continues bitwise; world 4 loads world 2's checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    rank = dist.get_rank()
    per = 16 // world
    xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]

    def build():
        torch.manual_seed(2)
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6)).double()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = SOAP(model.parameters(), **{**COMMON, "block_size": 1}, refresh_delay=1, placement="fsdp-local")
        return model, opt

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
        return [p.detach().full_tensor() for p in model.parameters()]

    out = {}
    if world == 2:
        model, opt = build()
        train(model, opt, 7)  # saved between a refresh (step 6) and its install (step 8)
        dcp.save(
            {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
            checkpoint_id=directory,
        )
        straight = train(model, opt, 6)
        torch.save(straight, os.path.join(directory, f"straight_{rank}.pt"))
        model2, opt2 = build()
        restored = _load(model2, opt2, directory, dcp, get_optimizer_state_dict, set_optimizer_state_dict)
        out["bitwise"] = all(torch.equal(a, b) for a, b in zip(train(model2, opt2, 6), straight, strict=True))
        out["restored_steps"] = restored
        out["placement"] = opt.stats()["placement"]
    else:
        model, opt = build()
        out["restored_steps"] = _load(
            model, opt, directory, dcp, get_optimizer_state_dict, set_optimizer_state_dict
        )
        got = train(model, opt, 6)
        straight = torch.load(os.path.join(directory, "straight_0.pt"))
        out["rel_to_world2"] = _rel(got, straight)
    return out


def _load(model, opt, directory, dcp, get_osd, set_osd):
    state = {"model": model.state_dict(), "optim": get_osd(model, opt)}
    dcp.load(state, checkpoint_id=directory)
    model.load_state_dict(state["model"])
    set_osd(model, opt, optim_state_dict=state["optim"])
    return sorted({int(v.item()) for v in (e["step"] for e in opt.state_dict()["state"].values())})


SCENARIOS = {
    2: [
        replicated,
        ddp_model,
        fsdp_aligned,
        fsdp_unblocked,
        delayed,
        plan_mismatch,
        refresh_failure,
        unsupported,
        nonfinite_shard,
        checkpoint,
    ],
    4: [replicated, explicit_group, ddp_model, fsdp_aligned, fsdp_unblocked, hsdp, checkpoint],
}


def _worker(rank, world, init_file, out_dir, ckpt_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import owner_scenarios  # imports this module: loaded here, once both are defined

    results = {}
    for scenario in SCENARIOS[world] + owner_scenarios.SCENARIOS[world]:
        try:
            args = (world, ckpt_dir) if scenario.__code__.co_argcount == 2 else (world,)
            results[scenario.__name__] = scenario(*args)
        except Exception:  # reported to the test, which fails with the traceback
            results[scenario.__name__] = {"exception": traceback.format_exc()}
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # every rank has saved
    # Leave without tearing the group down: gloo's teardown has aborted a process after every result
    # was saved ("terminate called without an active exception"), which failed the whole world.
    os._exit(0)


def run_world(world: int, ckpt_dir: str) -> list[dict]:
    """Run every scenario of this world size; one result dict per rank."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, ckpt_dir), nprocs=world)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
