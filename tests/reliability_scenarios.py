"""Faults on 2 gloo ranks, as a new user meets them: each must end in the same decision or a clear
error on every rank, never a silent divergence or a hang (issue 12; docs/design.md, "Failure
behaviour"). Scenarios that leave a collective unmatched run in a spawn of their own."""

from __future__ import annotations

import copy
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from soap_dist import SOAP

KW = dict(lr=0.02, precondition_frequency=3, max_precond_dim=20, factor_dtype=torch.float64, fused=False)
SHAPES = [(6, 4), (6, 4), (5, 3)]  # two of the same shape, so a swap keeps every shape in place
NOTICED_TIMEOUT_S = 60  # a rank whose peer raised must stop long before it: the failure notice tells it
NOTICE_WAIT_S = 5  # what "long before" is in the tests: a notice arrives within about a second


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64, generator=gen)) for s in SHAPES]


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES]


def _steps(params, opt, steps):
    for step in range(steps):
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = g
        opt.step()


def _error(fn) -> str:
    try:
        fn()
    except Exception as error:  # reported to the test
        return f"{type(error).__name__}: {error}"
    return ""


def _same_everywhere(tensors) -> bool:
    mine = torch.cat([t.detach().reshape(-1) for t in tensors])
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return all(torch.equal(every[0], t) for t in every)


# ----- scenarios in one shared group: every rank ends in the same place -----
def swapped_params(rank):
    """Two same-shape parameters swapped in one rank's list: the plan check names the parameter."""
    params = _params()
    order = [1, 0, 2] if rank == 1 else [0, 1, 2]
    opt = SOAP([params[i] for i in order], **KW)
    for p, g in zip(params, _grads(0), strict=True):
        p.grad = g
    plain = _error(opt.step)
    mesh = init_device_mesh("cpu", (2,))
    named = [
        (f"w{i}", torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])))
        for i, p in enumerate(params)
    ]
    named = [named[i] for i in order]
    sopt = SOAP(named, placement="fsdp-local", **KW)
    for _, p in named:
        p.grad = torch.zeros_like(p)
    return {"plain": plain, "named": _error(sopt.step)}


def refresh_delay_differs(rank):
    """An option folded into the plan's hash (refresh_delay) differing between ranks: the plan check
    names it and each rank's value (before: only 'ranks disagree on the block/factor plan')."""
    params = _params()
    opt = SOAP(params, **{**KW, "refresh_delay": rank})
    return {"error": _error(lambda: _steps(params, opt, 1))}


def nan_on_one_replica(rank):
    """A NaN in one replica's gradient after DDP's sync: every replica skips that parameter alike."""
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = SOAP(params, **KW)
    for step in range(6):
        grads = _grads(step)
        if step == 4 and rank == 1:
            grads[2][0, 0] = float("nan")
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        if step == 3:
            before = [p.detach().clone() for p in params]
    after_skip = params[2].detach().clone()
    return {
        "same": _same_everywhere(params),
        "finite": all(bool(torch.isfinite(p).all()) for p in params),
        "moved_others": not torch.equal(params[0].detach(), before[0]),
        "skipped_on_every_rank": bool(torch.isfinite(after_skip).all()),
    }


def frequency_changed(rank):
    """precondition_frequency changed on one rank after the first step: an error on every rank."""
    params = _params()
    opt = SOAP(params, **KW)

    def run():
        for step in range(8):
            if step == 2 and rank == 1:
                opt.param_groups[0]["precondition_frequency"] = 2
            for p, g in zip(params, _grads(step), strict=True):
                p.grad = g
            opt.step()

    # Raised on every rank before anything of the step is applied: no rank is marked as broken
    return {"error": _error(run), "broken": opt._engine.broken}


def compile_failed_on_one_rank(rank):
    """fused=None tries the compiled step (on CUDA); a compile failing on one rank alone turned that
    rank eager, and replicas drifted apart by rounding, silently: now an error on every rank."""
    from soap_dist import kernels

    params = _params()
    opt = SOAP(params, **{**KW, "fused": None})
    _steps(params, opt, 1)
    opt._engine.fused = True  # what fused=None picks on CUDA

    def compiled():
        if rank == 1:
            raise RuntimeError("simulated: inductor found no C++ compiler")
        return kernels.adam_direction

    def nowhere():
        raise RuntimeError("simulated: inductor found no C++ compiler")

    # Under owner one rank computes the update; the other, owning nothing, never tries the compile:
    # fused differs between the ranks, harmlessly, and the run goes on.
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(5)
    owned = torch.nn.Parameter(
        distribute_tensor(torch.randn(6, 4, dtype=torch.float64, generator=gen), mesh, [Shard(0)])
    )
    owner = SOAP([owned], placement="owner", **{**KW, "fused": None})

    def owner_steps():
        for step in range(4):
            owned.grad = distribute_tensor(_grads(step)[0], mesh, [Shard(0)])
            owner.step()
            if step == 0:
                owner._engine.fused = True

    # Under HSDP (here 2 replicas of 1 shard) the replicas of a shard both compute its rows' update
    grid = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    hsdp_params = [
        torch.nn.Parameter(distribute_tensor(p.detach().clone(), grid, [Replicate(), Shard(0)]))
        for p in _params()
    ]
    hsdp = SOAP(hsdp_params, placement="hsdp", **{**KW, "fused": None})

    def hsdp_steps():
        for step in range(4):
            for p, g in zip(hsdp_params, _grads(step), strict=True):
                p.grad = distribute_tensor(g, grid, [Replicate(), Shard(0)])
            hsdp.step()
            if step == 0:
                hsdp._engine.fused = True

    real = kernels.fused_adam_direction
    try:
        kernels.fused_adam_direction = compiled
        error = _error(lambda: _steps(params, opt, 4))
        hsdp_error = _error(hsdp_steps)
        kernels.fused_adam_direction = nowhere
        owner_error = _error(owner_steps)
    finally:
        kernels.fused_adam_direction = real
    return {
        "error": error,
        "hsdp_error": hsdp_error,
        "owner_error": owner_error,
        "owner_fused": owner._engine.fused,
    }


def unsynced_gradients(rank):
    """One parameter's gradient that differs between replicas (no_sync misuse, or a parameter DDP
    never all-reduces): named, on every rank."""
    params = _params()
    opt = SOAP(params, **KW)

    def run():
        for step in range(3):
            grads = _grads(step)
            if step == 2 and rank == 1:
                grads[1] = grads[1] * 1.5
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()

    return {"error": _error(run)}


def gradient_missing_on_one_rank(rank):
    """A parameter with a gradient on rank 0 and none on rank 1, under each placement: named as such,
    on every rank, before anything of the step is applied (under owner, before the gradient gather,
    whose sizes follow the parameters stepped: it aborted the process on a size mismatch; under
    fsdp-local and hsdp it went unnoticed and the ranks drifted apart)."""
    mesh = init_device_mesh("cpu", (2,))
    out = {}
    for placement in ("replicated", "owner", "fsdp-local"):
        plain = placement == "replicated"

        def spread(t, plain=plain):
            return t if plain else distribute_tensor(t, mesh, [Shard(0)])

        params = [torch.nn.Parameter(spread(p.detach())) for p in _params()]
        opt = SOAP(params, **KW) if plain else SOAP(params, placement=placement, **KW)
        for step in range(2):
            for p, g in zip(params, _grads(step), strict=True):
                p.grad = spread(g)
            opt.step()
        before = [p.detach().clone() for p in params]
        grads = [spread(g) for g in _grads(2)]  # (distribute_tensor is a collective: on every rank)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if (rank == 1 and p is params[1]) else g
        error = _error(opt.step)
        unchanged = all(torch.equal(a.detach(), b) for a, b in zip(params, before, strict=True))
        out[placement] = {"error": error, "unchanged": unchanged, "broken": opt._engine.broken}
    return out


def held_state_dict(rank):
    """hold_state_dict on every rank, then state_dict() on rank 0 alone (the HF Trainer's save under
    DDP): no other rank is needed, and it equals the collective state_dict()."""
    params = _params()
    opt = SOAP(params, collective_timeout=20, **KW)
    _steps(params, opt, 4)
    opt.hold_state_dict(keep=rank == 0)
    alone = opt.state_dict() if rank == 0 else None  # without the hold: a timeout naming rank 1
    both = opt.state_dict()  # the collective, on every rank
    same = alone is None or all(
        torch.equal(alone["state"][i][k], v) for i, entry in both["state"].items() for k, v in entry.items()
    )
    taken = opt._held_state is None  # taken once: the next call is the collective
    opt.hold_state_dict(keep=True)
    _steps(params, opt, 1)
    return {"same": same, "taken": taken, "dropped_at_step": opt._held_state is None}


def corrupt_shard(rank):
    """A checkpoint whose shard is corrupt on one rank only: every rank refuses it."""
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(8, 4, dtype=torch.float64, generator=gen) for _ in range(2)]
    params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in full]
    opt = SOAP(params, placement="owner", **KW)
    for _ in range(4):
        for p in params:
            p.grad = distribute_tensor(
                torch.randn(8, 4, dtype=torch.float64, generator=gen), mesh, [Shard(0)]
            )
        opt.step()
    sd = opt.state_dict()
    value = sd["state"][0]["exp_avg"]
    if rank == 1:
        value.to_local()[0, 0] = float("nan")
    for group in sd["param_groups"]:
        group["lr"] = 0.5  # a refused load must not take the checkpoint's hyperparameters either
    error = _error(lambda: opt.load_state_dict(sd))
    again = opt.state_dict()  # the refused load left the optimizer's state as it was
    kept = all(
        torch.equal(again["state"][i][k].to_local(), v.to_local())
        if isinstance(v, DTensor)
        else torch.equal(again["state"][i][k], v)
        for i, entry in sd["state"].items()
        for k, v in entry.items()
        if (i, k) != (0, "exp_avg")
    )
    return {"error": error, "kept": kept, "lr": opt.param_groups[0]["lr"], "steps": opt._engine.steps}


def frozen_and_foreign_states(rank):
    """FSDP2 under owner with a frozen parameter: DCP leaves its entry out, and the state loads and
    continues bitwise; an AdamW state is refused on every rank as not SOAP's, the optimizer unharmed."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    gen = torch.Generator().manual_seed(5)
    x, y = (
        torch.randn(8, 6, dtype=torch.float64, generator=gen),
        torch.randn(8, 4, dtype=torch.float64, generator=gen),
    )

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
        model[0].bias.requires_grad_(False)
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        return model, SOAP(model.parameters(), placement="owner", **KW)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(
                model(x[rank * 4 : rank * 4 + 4]), y[rank * 4 : rank * 4 + 4]
            ).backward()
            opt.step()
        return [p.detach().full_tensor() for p in model.parameters()]

    model, opt = build()
    train(model, opt, 4)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    weights = copy.deepcopy(model.state_dict())
    straight = train(model, opt, 4)
    model2, opt2 = build()
    model2.load_state_dict(weights)
    loaded = _error(lambda: set_optimizer_state_dict(model2, opt2, saved))
    resumed = train(model2, opt2, 4)
    return {
        "loaded": loaded,
        "bitwise": all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True)),
        "adamw": _foreign(model, opt, train),
    }


def _foreign(model, opt, train) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    train(model, adamw, 1)
    foreign = get_optimizer_state_dict(model, adamw)
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    error = _error(lambda: set_optimizer_state_dict(model, opt, foreign))
    after = train(model, opt, 1)
    return {"error": error, "stepped": any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))}


def raised_before_any_collective_and_stepped_again(rank):
    """A raise before the step's first collective leaves nothing apart: after the user fixes the cause
    and steps again, both ranks end where a run without the fault ends (placement owner, whose step
    checks its input before its first collective, the gather of gradient rows)."""
    mesh = init_device_mesh("cpu", (2,))
    results = {}
    for inject in (False, True):
        gen = torch.Generator().manual_seed(5)
        full = [torch.randn(8, 4, dtype=torch.float64, generator=gen) for _ in range(2)]
        params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in full]
        opt = SOAP(params, placement="owner", collective_timeout=NOTICED_TIMEOUT_S, **KW)
        errors = []
        for step in range(6):
            for p in params:  # (distribute_tensor is a collective: called alike on both ranks)
                p.grad = distribute_tensor(
                    torch.randn(8, 4, dtype=torch.float64, generator=gen), mesh, [Shard(0)]
                )
            if inject and step == 3 and rank == 0:

                def boom(*args, **kwargs):
                    raise ValueError("injected: before the gather")

                opt._owner._check_spread_groups = boom  # the first thing the owner's step does
                errors.append(_error(opt.step))
                del opt._owner._check_spread_groups  # the method again: the user fixed the cause
            opt.step()
        results[inject] = ([p.full_tensor() for p in params], errors)
    (clean, _), (faulted, errors) = results[False], results[True]
    same = all(torch.equal(a, b) for a, b in zip(clean, faulted, strict=True))
    return {"errors": errors, "same_as_clean": same}


SHARED = [
    swapped_params,
    refresh_delay_differs,
    nan_on_one_replica,
    frequency_changed,
    unsynced_gradients,
    compile_failed_on_one_rank,
    gradient_missing_on_one_rank,
    held_state_dict,
    corrupt_shard,
    frozen_and_foreign_states,
]


# ----- scenarios that leave a collective unmatched: one spawn each, short timeouts -----
def _two_steps_with_a_short_timeout():
    params = _params()
    opt = SOAP(params, collective_timeout=3, **KW)
    _steps(params, opt, 2)
    return params, opt


def only_rank0_steps(rank):
    params, opt = _two_steps_with_a_short_timeout()
    if rank == 1:
        return {"error": ""}
    for p, g in zip(params, _grads(2), strict=True):
        p.grad = g
    return {"error": _error(opt.step)}


def save_on_rank0_only(rank):
    """The usual DDP idiom, ``if rank == 0: torch.save(opt.state_dict(), f)``: a clear error on rank 0;
    then, the save fixed, the run steps and saves on every rank as before (nothing left out of step)."""
    params, opt = _two_steps_with_a_short_timeout()
    error = _error(opt.state_dict) if rank == 0 else ""
    dist.barrier()  # rank 1 waits for rank 0's timeout, as a user's rank would at its next collective
    _steps(params, opt, 1)
    return {"error": error, "saved_after": _error(opt.state_dict)}


ALONE = [  # and tests/peer_failure_scenarios.py's, run through this module's ``run``
    only_rank0_steps,
    save_on_rank0_only,
    raised_before_any_collective_and_stepped_again,  # alone: were the rule broken, a collective is left open
]


def _worker(rank: int, world: int, init: str, out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import peer_failure_scenarios  # imports this module: loaded here, once both are defined

    results = {}
    for name in names:
        try:
            results[name] = (globals().get(name) or getattr(peer_failure_scenarios, name))(rank)
        except Exception:
            results[name] = {"exception": traceback.format_exc()}
        if len(names) > 1:
            dist.barrier()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    if len(names) > 1:
        dist.barrier()  # both ranks have saved
    # Leave without tearing the group down: a collective a fault left pending (and, seen once on the
    # CI machine, gloo's own teardown after several faults) can abort the process in destroy.
    os._exit(0)


def run(names: list[str], world: int = 2) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, names), nprocs=world)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


__all__ = ["ALONE", "SHARED", "DTensor", "run"]
