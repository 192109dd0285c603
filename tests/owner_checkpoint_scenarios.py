"""Placement "owner" checkpoints on spawned gloo ranks: DCP round trips that continue bitwise and
load at other world sizes, meshes and placements (run from owner_scenarios' lists; float64).
"""

from __future__ import annotations

import copy
import os

import dist_scenarios as ds
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from soap_dist import SOAP


class _Tagger(torch.nn.Module):
    """An embedding with no row factor (200 rows > max_precond_dim) that owner leaves spread."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(200, 6)
        self.head = torch.nn.Linear(6, 7)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


class _DeepTagger(torch.nn.Module):
    """_Tagger with one more layer: four owned parameters beside the spread embedding."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(200, 6)
        self.hidden = torch.nn.Linear(6, 9)
        self.head = torch.nn.Linear(9, 7)

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(torch.tanh(self.embed(ids)))))


def _deep_tagger():
    torch.manual_seed(2)
    return _DeepTagger().double()


def _mlp():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 7)).double()


def _deep_mlp():
    """Five layers: at world 2 the owners' staggered phases differ from one process's."""
    torch.manual_seed(2)
    layers = [module for _ in range(4) for module in (torch.nn.Linear(6, 6), torch.nn.Tanh())]
    layers.append(torch.nn.Linear(6, 7))
    return torch.nn.Sequential(*layers).double()


def _tagger():
    torch.manual_seed(2)
    return _Tagger().double()


def owner_checkpoint(world, directory):
    """FSDP2 models under owner: DCP save at world 2 continues bitwise; world 4 and one process load it.
    The second model's embedding is spread (its rows never move, in the steps or the checkpoint)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 200, (16,), generator=gen)
    y = torch.randn(16, 7, generator=gen, dtype=torch.float64)
    out = _owner_round_trip(world, os.path.join(directory, "owner"), _mlp, x, y)
    spread = _owner_round_trip(world, os.path.join(directory, "owner_spread"), _tagger, ids, y)
    # staggered phases follow the owners: world 2's differ from one process's; the checkpoint's
    # phases keep the run the same
    staggered = _owner_round_trip(
        world, os.path.join(directory, "owner_staggered"), _deep_mlp, x, y, refresh_schedule="staggered"
    )
    out |= {f"spread_{k}": v for k, v in spread.items()}
    return out | {f"staggered_{k}": v for k, v in staggered.items()}


def owner_hsdp_checkpoint(world, directory):
    """HSDP 2 x 2 under owner, owners over the whole mesh: a DCP checkpoint continues bitwise, and
    owners inside each shard group, FSDP2 over 4 ranks and one process load it. The embedding is
    spread, its shard rows cut between the replicas."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    path = os.path.join(directory, "owner_hsdp")
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 200, (16,), generator=gen)
    y = torch.randn(16, 7, generator=gen, dtype=torch.float64)
    square = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    flat = init_device_mesh("cpu", (world,))
    kw = {**ds.COMMON, "block_size": 3}

    def build(mesh, scope="world"):
        model = _deep_tagger()
        for layer in model.children():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = SOAP(model.parameters(), placement="owner", refresh_delay=1, owner_scope=scope, **kw)
        return model, opt

    def train(model, opt, steps):
        xs, ys = ids[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
        return [p.detach().full_tensor() for p in model.parameters()]

    def load(model, opt):
        return ds._load(model, opt, path, dcp, get_optimizer_state_dict, set_optimizer_state_dict)

    model, opt = build(square)
    train(model, opt, 7)  # saved between a refresh (step 6) and its install (step 8)
    out = {"spread": [i for i, spread in enumerate(opt._owner.spread) if spread], "owners": opt._owner.owners}
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    straight = train(model, opt, 6)
    again, opt2 = build(square)
    out["restored_steps"] = load(again, opt2)
    out["bitwise"] = all(torch.equal(a, b) for a, b in zip(train(again, opt2, 6), straight, strict=True))
    for name, mesh, scope in (("shard_group", square, "shard_group"), ("fsdp4", flat, "world")):
        other, other_opt = build(mesh, scope)
        load(other, other_opt)
        out[f"rel_{name}"] = ds._rel(train(other, other_opt, 6), straight)
    if rank == 0:
        single = _deep_tagger()
        sopt = SOAP(single.parameters(), placement="single", refresh_delay=1, **kw)
        template = {"model": single.state_dict(), "optim": _single_template(single, sopt)}
        dcp.load(template, checkpoint_id=path, no_dist=True)
        single.load_state_dict(template["model"])
        sopt.load_state_dict(template["optim"])
        for _ in range(6):
            sopt.zero_grad()
            torch.nn.functional.mse_loss(single(ids), y).backward()
            sopt.step()
        out["rel_single"] = ds._rel([p.detach() for p in single.parameters()], straight)
    return out


def _train(model, opt, steps, xs, ys):
    """``steps`` MSE steps on one batch; the whole parameters after them."""
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
    return [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]


def _owner_round_trip(world, path, model_of, x, y, **options):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    kw = {**ds.COMMON, "block_size": 3, **options}

    def build():
        model = model_of()
        for layer in model.children():
            if isinstance(layer, torch.nn.Linear | torch.nn.Embedding):
                fully_shard(layer)
        fully_shard(model)
        return model, SOAP(model.parameters(), placement="owner", refresh_delay=1, **kw)

    per = 16 // world
    xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    out = {}
    if world == 2:
        model, opt = build()
        _train(model, opt, 7, xs, ys)  # saved between a refresh (step 6) and its install (step 8)
        out["spread"] = [i for i, spread in enumerate(opt._owner.spread) if spread]
        dcp.save(
            {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path
        )
        straight = _train(model, opt, 6, xs, ys)
        torch.save(straight, os.path.join(path, "straight.pt"))
        model2, opt2 = build()
        out["restored_steps"] = ds._load(
            model2, opt2, path, dcp, get_optimizer_state_dict, set_optimizer_state_dict
        )
        out["bitwise"] = all(
            torch.equal(a, b) for a, b in zip(_train(model2, opt2, 6, xs, ys), straight, strict=True)
        )
        out["placement"] = opt.stats()["placement"]
        out["phases"] = list(opt._engine.phases)
        return out
    straight = torch.load(os.path.join(path, "straight.pt"))
    model, opt = build()
    out["restored_steps"] = ds._load(
        model, opt, path, dcp, get_optimizer_state_dict, set_optimizer_state_dict
    )
    out["rel_world4"] = ds._rel(_train(model, opt, 6, xs, ys), straight)
    out["phases"] = list(opt._engine.phases)
    out["spread"] = [i for i, spread in enumerate(opt._owner.spread) if spread]
    # one process (no sharding, placement "single") loads the same checkpoint: a plain-tensor template
    if rank == 0:
        single = model_of()
        sopt = SOAP(single.parameters(), placement="single", refresh_delay=1, **kw)
        for p in single.parameters():
            p.grad = None
        sopt.step()  # builds zero state (first call with no gradients does nothing) -> use DCP's template
        template = {"model": single.state_dict(), "optim": _single_template(single, sopt)}
        dcp.load(template, checkpoint_id=path, no_dist=True)
        single.load_state_dict(template["model"])
        computed = list(sopt._engine.phases)
        sopt.load_state_dict(template["optim"])
        out["rel_single"] = ds._rel(_train(single, sopt, 6, x, y), straight)
        out["single_phases"] = (computed, list(sopt._engine.phases))
    return out


def _single_template(model, opt):
    """The optimizer's state_dict keyed by parameter name, as DCP's get_optimizer_state_dict gives."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # a zero gradient builds the state without moving anything
    for p in model.parameters():
        p.grad = None
    sd = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    state = {names[i]: v for i, v in sd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def owner_full_state_dict(world, directory):
    """The consolidated checkpoint (DCP's full_state_dict=True, cpu_offload=True: full tensors on rank 0,
    for an export or a torch.save) under owner, with a spread embedding whose state is sharded:
    loaded back with broadcast_from_rank0 it continues bitwise, and one process continues from it.
    And torchtitan's flatten_optimizer_state_dict=True through dcp.save/dcp.load: continues bitwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 200, (16,), generator=gen)
    y = torch.randn(16, 7, generator=gen, dtype=torch.float64)
    kw = {**ds.COMMON, "block_size": 3, "refresh_delay": 1}
    per = 16 // world

    def build():
        model = _deep_tagger()
        for layer in model.children():
            fully_shard(layer)
        fully_shard(model)
        return model, SOAP(model.parameters(), placement="owner", **kw)

    mine = ids[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    model, opt = build()
    _train(model, opt, 7, *mine)  # between a refresh (step 6) and its install (step 8)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    saved = {
        "model": get_model_state_dict(model, options=full),
        "optim": get_optimizer_state_dict(model, opt, options=full),
    }
    out = {
        "spread": [i for i, spread in enumerate(opt._owner.spread) if spread],
        "rank0_holds": bool(saved["optim"]),
    }
    straight = _train(model, opt, 6, *mine)
    again, opt2 = build()
    given = copy.deepcopy(saved) if rank == 0 else {"model": {}, "optim": {}}  # DCP fills it in place
    spread_back = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(again, given["model"], options=spread_back)
    set_optimizer_state_dict(again, opt2, given["optim"], options=spread_back)
    out["bitwise"] = all(
        torch.equal(a, b) for a, b in zip(_train(again, opt2, 6, *mine), straight, strict=True)
    )
    # flattened (torch rebuilds each entry on load from the key names in opt.state)
    flat, path = StateDictOptions(flatten_optimizer_state_dict=True), os.path.join(directory, "owner_flat")
    model, opt = build()
    _train(model, opt, 7, *mine)
    dcp.save(
        {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt, options=flat)},
        checkpoint_id=path,
    )
    straight = _train(model, opt, 6, *mine)
    again, opt2 = build()
    template = {"model": again.state_dict(), "optim": get_optimizer_state_dict(again, opt2, options=flat)}
    dcp.load(template, checkpoint_id=path)
    again.load_state_dict(template["model"])
    set_optimizer_state_dict(again, opt2, template["optim"], options=flat)
    out["flat_bitwise"] = all(
        torch.equal(a, b) for a, b in zip(_train(again, opt2, 6, *mine), straight, strict=True)
    )
    if rank == 0:
        single = _deep_tagger()
        single.load_state_dict(saved["model"])
        sopt = SOAP(single.parameters(), placement="single", **kw)
        set_optimizer_state_dict(single, sopt, saved["optim"], options=StateDictOptions(full_state_dict=True))
        out["rel_single"] = ds._rel(_train(single, sopt, 6, ids, y), straight)
    return out
