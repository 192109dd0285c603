"""Placement "owner" on spawned gloo ranks, against one process on the same global batch (float64).

Run inside dist_scenarios' worker (one process group per world size); each scenario returns plain
numbers and strings for tests/test_owner.py.
"""

from __future__ import annotations

import dist_scenarios as ds
import owner_checkpoint_scenarios as ckpt
import regroup_scenarios as regroup
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from soap_dist import SOAP
from soap_dist.owner_layout import param_state, step_traffic

# No block_size requirement: 17 rows over 2 or 4 shards, a (3, 2) smaller than world 4, an
# "embedding" with no row factor, a bias, and blocks that straddle shard boundaries.
VARIANTS = {
    "b_none": dict(block_size=None),
    "b_none_delay1": dict(block_size=None, refresh_delay=1),
    "b3": dict(block_size=3),
    "b3_delay1": dict(block_size=3, refresh_delay=1),
    "b3_delay1_async": dict(block_size=3, refresh_delay=1, async_refresh=True),
}


# (200, 6): an "embedding" with no row factor whose whole state would outweigh every other rank's:
# owner leaves it spread (owner_layout.spread_params) at world 2 and 4.
SPREAD_SHAPES = [(17, 6), (3, 2), (200, 6), (6,), (16, 4), (5, 5), (5, 5)]


def _gather_objects(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def owner_exact(world):
    """owner equals one process with the same options, at any world size and block size."""
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, kw in VARIANTS.items():
        got, opt = ds._distributed(mesh, [Shard(0)], placement="owner", **kw)
        synchronous = {k: v for k, v in kw.items() if k != "async_refresh"}  # async against sync
        out[f"rel_{name}"] = ds._rel(got, ds.one_process(**synchronous))
        out["placement"] = opt.stats()["placement"]
    return out


def owner_spread_exact(world):
    """A spread parameter (rows where FSDP2 put them, column factor shared) keeps owner exact."""
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, kw in VARIANTS.items():
        got, opt = ds._distributed(mesh, [Shard(0)], shapes=SPREAD_SHAPES, placement="owner", **kw)
        synchronous = {k: v for k, v in kw.items() if k != "async_refresh"}
        out[f"rel_{name}"] = ds._rel(got, ds.one_process(shapes=SPREAD_SHAPES, **synchronous))
        out["spread"] = [i for i, spread in enumerate(opt._owner.spread) if spread]
        out["spread_names"] = opt.stats()["spread_params"]
    # normalize_grads divides a whole block by its RMS: nothing is spread, and the result stays exact
    got, opt = ds._distributed(
        mesh, [Shard(0)], shapes=SPREAD_SHAPES, placement="owner", normalize_grads=True
    )
    out["rel_normalized"] = ds._rel(got, ds.one_process(shapes=SPREAD_SHAPES, normalize_grads=True))
    out["spread_normalized"] = opt.stats()["spread_params"]
    # turned on later, over a spread parameter: an error on every rank, not a silent difference
    _, opt = ds._distributed(mesh, [Shard(0)], shapes=SPREAD_SHAPES, steps=2, placement="owner")
    opt.param_groups[0]["normalize_grads"] = True
    for p in opt._params():
        p.grad = torch.ones_like(p)
    try:
        opt.step()
        out["normalized_later"] = ""
    except ValueError as error:
        out["normalized_later"] = str(error)
    return out


def owner_state_and_traffic(world):
    """Per-rank state from stats() against the bound, and the per-step traffic against the formula."""
    mesh = init_device_mesh("cpu", (world,))
    steps = 5  # the refresh at 3 is not between 4 and 5
    got, opt = ds._distributed(mesh, [Shard(0)], placement="owner", steps=steps - 1)
    before = opt.stats()
    params = opt._params()
    for p, g in zip(params, ds._grads(ds.SHAPES, steps, seed=9)[-1], strict=True):
        p.grad = distribute_tensor(g, mesh, [Shard(0)])
    opt.step()
    after = opt.stats()
    stats = after
    runner = opt._owner
    sizes = [p.element_size() for p in params]
    formula = step_traffic(runner.layouts, runner.owners, world, runner.shard, sizes, sizes)
    flags = 8 * (len(params) + 2)  # the per-step all_reduce(MIN): int64 flags and [w, -w] for one word
    _, single = ds._distributed(None, None, placement="single")
    s = single.stats()
    single_total = s["factor_bytes"] + s["basis_bytes"] + s["moment_bytes"]
    largest = max(
        (st.statistics + st.bases) * 8 + st.moments * 8 for st in (param_state(lay) for lay in runner.layouts)
    )
    mine = stats["factor_bytes"] + stats["basis_bytes"] + stats["moment_bytes"]
    return {
        "state": _gather_objects(mine),
        "single_total": single_total,
        "largest": largest,
        "sent": after["bytes_sent"] - before["bytes_sent"],
        "received": after["bytes_received"] - before["bytes_received"],
        "formula_sent": formula[0] + flags,
        "formula_received": formula[1] + flags,
        "owned_params": len(runner.owned),
    }


def owner_narrow_values(world):
    """float32 parameters with float64 factors, and bf16 parameters with float32 factors: gradients
    travel in the parameters' dtype, updates in the step's compute dtype (float64, float32), and the
    result is one process's with the same dtypes."""
    mesh = init_device_mesh("cpu", (world,))
    shapes = ds.SHAPES
    out = {}
    for name, dtype, factor_dtype in (
        ("float32", torch.float32, torch.float64),
        ("bfloat16", torch.bfloat16, torch.float32),
    ):
        inits = [w.to(dtype) for w in ds._inits(shapes)]
        grads = [[g.to(dtype) for g in gs] for gs in ds._grads(shapes, 7)]
        kw = {**ds.COMMON, "factor_dtype": factor_dtype}
        got, opt, sent = _steps(
            inits, grads, lambda t: distribute_tensor(t.clone(), mesh, [Shard(0)]), **kw, placement="owner"
        )
        want, _, _ = _steps(inits, grads, lambda t: t.clone(), **kw)
        runner = opt._owner
        sizes = [torch.empty((), dtype=dtype).element_size()] * len(shapes)
        updates = [torch.empty((), dtype=factor_dtype).element_size()] * len(shapes)
        formula = step_traffic(runner.layouts, runner.owners, world, runner.shard, sizes, updates)
        out[name] = {
            "rel": max(
                ((a - b).float().norm() / b.float().norm()).item() for a, b in zip(got, want, strict=True)
            ),
            "dtypes": sorted({str(t.dtype) for t in got}),
            "sent_last": sent[-1],
            "formula_sent": formula[0] + 8 * (len(shapes) + 2),  # + the finite-flag all_reduce
        }
    return out


def _steps(inits, grads, make, **kw):
    """SOAP from ``inits`` over the gradients: the full parameters, the optimizer, bytes sent per step."""
    params = [torch.nn.Parameter(make(w)) for w in inits]
    opt = SOAP(params, **kw)
    sent = []
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = make(g)
        before = opt.stats().get("bytes_sent", 0)  # one process has no such counter
        opt.step()
        sent.append(opt.stats().get("bytes_sent", 0) - before)
    full = [p.detach().full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in params]
    return full, opt, sent


def owner_hsdp(world):
    """HSDP 2 x (world/2): owners over the whole mesh (or, with owner_scope="shard_group", inside each
    shard group), replicas identical, equal to one process; the state per rank from stats()."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for name, variant, shapes, scope in (
        ("b_none", "b_none", ds.SHAPES, "world"),
        ("b3_delay1", "b3_delay1", ds.SHAPES, "world"),
        ("spread_b3_delay1", "b3_delay1", SPREAD_SHAPES, "world"),
        ("spread_b3_delay1_async", "b3_delay1_async", SPREAD_SHAPES, "world"),
        ("shard_group_b_none", "b_none", ds.SHAPES, "shard_group"),
        ("shard_group_spread_b3_delay1", "b3_delay1", SPREAD_SHAPES, "shard_group"),
    ):
        kw = VARIANTS[variant]
        got, opt = ds._distributed(
            mesh, [Replicate(), Shard(0)], shapes=shapes, placement="owner", owner_scope=scope, **kw
        )
        synchronous = {k: v for k, v in kw.items() if k != "async_refresh"}  # async against sync
        out[f"rel_{name}"] = ds._rel(got, ds.one_process(shapes=shapes, **synchronous))
        stats = opt.stats()
        out["placement"] = stats["placement"]
        out[f"same_{name}"] = ds._same_on_every_rank(got)
        out[f"spread_{name}"] = [i for i, spread in enumerate(opt._owner.spread) if spread]
        out[f"grid_{name}"] = stats["owner_grid"]
        out[f"state_{name}"] = _gather_objects(
            stats["factor_bytes"] + stats["basis_bytes"] + stats["moment_bytes"]
        )
    _, single = ds._distributed(None, None, placement="single")
    s = single.stats()
    out["single_total"] = s["factor_bytes"] + s["basis_bytes"] + s["moment_bytes"]
    out["largest"] = max(
        (st.statistics + st.bases + st.moments) * 8
        for st in (param_state(lay) for lay in opt._owner.layouts[: len(ds.SHAPES)])
    )
    return out


def owner_scope_mismatch(world):
    """Under HSDP, a rank with another owner_scope fails the plan check with every other rank (it
    would otherwise wait in other groups' collectives)."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Replicate(), Shard(0)]))
    scope = "shard_group" if dist.get_rank() == world - 1 else "world"
    opt = SOAP([p], placement="owner", owner_scope=scope, collective_timeout=60)
    p.grad = distribute_tensor(torch.randn(8, 6), mesh, [Replicate(), Shard(0)])
    try:
        opt.step()
        return {"error": ""}
    except RuntimeError as error:
        return {"error": f"{type(error).__name__}: {error}"}


def hsdp_replicas_hold_other_tensors(world):
    """Under HSDP, two same-shape parameters passed in another order on one rank (model.parameters(),
    no names): the replicas of that shard compare fingerprints of their shards at the plan check, and
    every rank stops (before, the run went on and the replicas drifted apart)."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    gen = torch.Generator().manual_seed(3)
    values = [torch.randn(8, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    out = {}
    faults = ("swap", "fewer", "replica")
    for placement, fault in [(p, f) for f in faults for p in ("hsdp", "owner")]:
        params = [torch.nn.Parameter(distribute_tensor(v, mesh, [Replicate(), Shard(0)])) for v in values]
        if fault == "replica":  # the whole second replica initialised otherwise (another seed on a node)
            shift = float(mesh.get_local_rank("replicate"))
            rows = [p.to_local().detach() + shift for p in params]
            params = [torch.nn.Parameter(DTensor.from_local(r, mesh, [Replicate(), Shard(0)])) for r in rows]
        last = dist.get_rank() == world - 1
        given = {"swap": params[::-1], "fewer": params[:1]}.get(fault, params) if last else params
        opt = SOAP(given, placement=placement, factor_dtype=torch.float64, collective_timeout=60)
        for p, v in zip(params, values, strict=True):
            p.grad = distribute_tensor(v * 0.5, mesh, [Replicate(), Shard(0)])
        try:
            opt.step()
            out[f"{placement}_{fault}"] = ""
        except RuntimeError as error:
            out[f"{placement}_{fault}"] = f"{type(error).__name__}: {error}"
    return out


def hsdp_replicas_gradients_differ(world):
    """Under HSDP, the gradient of one parameter changed on one replica after FSDP2's all-reduce (the
    last rank scales its shard): every rank stops, naming the parameter (before, the replicas drifted
    apart silently). Under owner_scope="shard_group" the replicas decide apart: unchecked (documented)."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    hsdp = [Replicate(), Shard(0)]
    gen = torch.Generator().manual_seed(4)
    values = [torch.randn(8, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    out = {}
    for placement, scope in (("hsdp", "world"), ("owner", "world"), ("owner", "shard_group")):
        params = [torch.nn.Parameter(distribute_tensor(v, mesh, hsdp)) for v in values]
        opt = SOAP(params, placement=placement, owner_scope=scope, factor_dtype=torch.float64)
        try:
            for step in range(3):
                for k, (p, v) in enumerate(zip(params, values, strict=True)):
                    rows = distribute_tensor(v * (step + 1), mesh, hsdp).to_local().clone()
                    if step == 2 and k == 1 and dist.get_rank() == world - 1:
                        rows *= 1.5
                    p.grad = DTensor.from_local(rows, mesh, hsdp)
                opt.step()
            out[f"{placement}_{scope}"] = ""
        except RuntimeError as error:
            out[f"{placement}_{scope}"] = f"{type(error).__name__}: {error}"
    return out


def owner_errors(world):
    """Bad input fails on every rank with a message, never a hang."""
    mesh = init_device_mesh("cpu", (world,))
    rank = dist.get_rank()
    out = {}

    def attempt(key, params, **kw):
        for p in params:
            p.grad = torch.zeros_like(p)
        try:
            SOAP(params, placement="owner", **kw).step()
            out[key] = ""
        except (ValueError, RuntimeError) as error:
            out[key] = f"{type(error).__name__}: {error}"

    attempt("plain", [torch.nn.Parameter(torch.randn(4, 8))])
    attempt("shard1", [torch.nn.Parameter(distribute_tensor(torch.randn(4, 8), mesh, [Shard(1)]))])

    def sharded(shape):  # from_local: no collective, so ranks may build different lists
        rows = -(-shape[0] // world)
        return torch.nn.Parameter(
            DTensor.from_local(torch.randn(rows, *shape[1:]), mesh, [Shard(0)], run_check=False)
        )

    width = 3 if rank == 0 else 4  # different shapes: different plans
    attempt("mismatch", [sharded((4 * world, width))])
    shapes = [(4 * world, 4), (2 * world, 3)] if rank == 0 else [(4 * world, 4)]  # missing elsewhere
    attempt("missing", [sharded(s) for s in shapes])
    # a gradient in another dtype than its values: every rank refuses it before any exchange (the
    # owner, which sends nothing, used to wait in the all_to_all until the timeout)
    p = torch.nn.Parameter(distribute_tensor(torch.randn(6, 12), mesh, [Shard(0)]))
    p.grad_dtype = None  # torch refuses a .grad of another dtype unless told to accept it
    opt = SOAP([p], placement="owner", collective_timeout=30)
    for _ in range(2):
        p.grad = distribute_tensor(torch.randn(6, 12).bfloat16(), mesh, [Shard(0)])
        try:
            opt.step()
            out["grad_dtype"] = ""
        except TypeError as error:
            out["grad_dtype"] = f"{type(error).__name__}: {error}"
            break
    return out


def owner_gradient_too_large_across_shards(world):
    """float64 weights, float32 factors: a gradient whose shards' norms are each below sqrt(max) but
    whose whole norm is not is skipped, as in one process. Each rank used to judge its own shard, and
    the owner's column factor, formed from the whole gradient, overflowed for good."""
    import warnings

    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3, dtype=torch.float64), mesh, [Shard(0)]))
    opt = SOAP([w], precondition_frequency=2, placement="owner")
    for step in range(6):
        g = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        if step == 3:
            g = torch.zeros(4, 3, dtype=torch.float64)
            g[:, 0] = 1.2e19  # whole norm 2.4e19 > 1.84e19; each 2-row shard 1.7e19
        w.grad = distribute_tensor(g, mesh, [Shard(0)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
    factor = opt.state_dict()["state"][0]["factor_1"]
    factor = factor.full_tensor() if isinstance(factor, DTensor) else factor
    stats = opt.stats()
    return {
        "finite": bool(factor.isfinite().all()),
        "skipped": stats["nonfinite_params_warned"],
        "failures": stats["refresh_failures"],
    }


SCENARIOS = {
    2: [
        owner_exact,
        owner_spread_exact,
        owner_state_and_traffic,
        owner_errors,
        ckpt.owner_checkpoint,
        ckpt.owner_full_state_dict,
        owner_narrow_values,
        owner_gradient_too_large_across_shards,
    ],
    4: [
        owner_exact,
        owner_spread_exact,
        owner_state_and_traffic,
        owner_hsdp,
        ckpt.owner_checkpoint,
        ckpt.owner_hsdp_checkpoint,
        owner_scope_mismatch,
        hsdp_replicas_hold_other_tensors,
        hsdp_replicas_gradients_differ,
    ],
}


def planner_counts(world):
    """plan.costs.rank_costs (what python -m soap_dist.plan prints) equals stats() on every rank."""
    from soap_dist.owner_layout import owner_placement
    from soap_dist.plan import OWNER, Topology, build_plan
    from soap_dist.plan.costs import rank_costs

    rank, k = dist.get_rank(), ds.COMMON["precondition_frequency"]
    flat = init_device_mesh("cpu", (world,))
    cases = {
        "replicated": (None, None, "replicated", Topology("replicated", world, 1, 0)),
        "fsdp-local": (flat, [Shard(0)], "fsdp-local", Topology("fsdp-local", 1, world, 0)),
        "owner": (flat, [Shard(0)], "owner", None),
        "owner_spread": (flat, [Shard(0)], "owner", None),
    }
    if world == 4:
        square = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        hsdp = [Replicate(), Shard(0)]
        cases["hsdp"] = (square, hsdp, "hsdp", Topology("hsdp", 2, 2, 0))
        cases["owner_hsdp_spread"] = (square, hsdp, "owner", None)  # owners over the whole mesh
        cases["owner_hsdp_shard_group"] = (square, hsdp, "owner", None)  # owners in each shard group
    out = {}
    for name, (mesh, placements, placement, topology) in cases.items():
        shapes = SPREAD_SHAPES if name.endswith("_spread") else ds.SHAPES
        scope = "shard_group" if name.endswith("shard_group") else "world"
        _, opt = ds._distributed(
            mesh, placements, shapes=shapes, steps=1, placement=placement, owner_scope=scope
        )
        before = opt.stats()
        params = opt._params()
        for gs in ds._grads(shapes, k, seed=7):  # calls 2 .. k + 1: k steps, one refresh
            for p, g in zip(params, gs, strict=True):
                p.grad = g if mesh is None else distribute_tensor(g, mesh, placements)
            opt.step()
        after = opt.stats()
        layouts = opt._layouts()
        eight = [8] * len(layouts)  # float64 parameters, moments and factors
        if placement == "owner" and "hsdp" in name:
            replicas = 2 if scope == "world" else 1  # the replicas the owners span
            owners, splits = owner_placement(layouts, 2, 8, eight, replicas=replicas)
            plan = build_plan(layouts, Topology(OWNER, 1, 2 * replicas, 0), splits)
            mine = rank_costs(plan, 8, eight, eight, owners, owner_grid=(replicas, 2))[rank % (2 * replicas)]
        elif placement == "owner":
            owners, splits = owner_placement(layouts, world, 8, eight)
            plan = build_plan(layouts, Topology(OWNER, 1, world, 0), splits)
            mine = rank_costs(plan, 8, eight, eight, owners)[rank]
        else:
            mine = rank_costs(build_plan(layouts, topology), 8, eight, eight)[rank]
        out[name] = {
            "stats": [after["factor_bytes"], after["basis_bytes"], after["moment_bytes"]],
            "counted": [mine.statistics, mine.bases, mine.moments],
            "traffic": [
                after["bytes_sent"] - before["bytes_sent"],
                after["bytes_received"] - before["bytes_received"],
            ],
            "counted_traffic": [
                k * mine.step_sent + mine.refresh_sent,
                k * mine.step_received + mine.refresh_received,
            ],
            "placement": after["placement"],
        }
    return out


SCENARIOS[2].append(planner_counts)
SCENARIOS[4].append(planner_counts)


def auto_choice(world):
    """placement="auto" under FSDP2: owner when fsdp-local's column state would exceed the shard, or
    when fsdp-local would not equal one process (row blocks that are the shards)."""
    mesh = init_device_mesh("cpu", (world,))
    wide = [(8 * world, 16), (4 * world, 12)]  # 16 x 16 and 12 x 12 column factors against short shards
    _, wide = ds._distributed(mesh, [Shard(0)], shapes=wide, steps=2, block_size=4)
    tall = dict(shapes=[(64 * world, 3), (32 * world, 2)], max_precond_dim=256)  # row factors too
    _, narrow = ds._distributed(mesh, [Shard(0)], steps=2, block_size=16, **tall)  # 3 x 3 column factors
    _, unblocked = ds._distributed(mesh, [Shard(0)], steps=2, **tall)
    _, across = ds._distributed(mesh, [Shard(0)], steps=2, block_size=24, **tall)  # blocks across shards
    return {
        "wide": wide.stats()["placement"],
        "narrow": narrow.stats()["placement"],
        "unblocked": unblocked.stats()["placement"],
        "across": across.stats()["placement"],
    }


SCENARIOS[2].append(auto_choice)


def owner_staggered(world):
    """refresh_schedule="staggered" under owner: each owner's work spread over the k steps, and the
    result equal to the oracle given the same phases."""
    from oracle import OracleSOAP

    shapes = [(8, 8), (7, 7), (6, 6), (6, 6), (5, 5), (4, 4), (7,)]  # square: full-rank factors
    mesh = init_device_mesh("cpu", (world,))
    kw = dict(lr=0.02, precondition_frequency=3, weight_decay=0.01)
    inits = ds._inits(shapes)
    params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in inits]
    opt = SOAP(params, placement="owner", refresh_schedule="staggered", **{**ds.F64, **kw})
    grads = ds._grads(shapes, 14)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        opt.step()
    phases = list(opt._engine.phases)
    oracle = OracleSOAP([w.clone() for w in inits], phases=phases, **kw)
    for gs in grads:
        oracle.step(gs)
    got = [p.detach().full_tensor() for p in params]
    owners = opt._owner.owners
    return {
        "rel": ds._rel(got, oracle.params),
        "phases": phases,
        "owners": owners,
        "staggered": len(set(phases)) > 1,
    }


SCENARIOS[2].append(owner_staggered)
SCENARIOS[4].append(owner_staggered)


SCENARIOS[2].append(regroup.auto_switch_on_add_param_group)
SCENARIOS[4].append(regroup.auto_switch_into_hsdp_is_refused)
