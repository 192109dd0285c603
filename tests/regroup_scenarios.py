"""add_param_group mid-run under placement="auto" on spawned gloo ranks (float64): the placement is
chosen again for the new set of parameters, and the state moves across or is refused on every rank.
Run inside dist_scenarios' worker, registered in owner_scenarios.SCENARIOS."""

from __future__ import annotations

import dist_scenarios as ds
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from soap_dist import SOAP


def _add_group_run(make, shapes, placement=None):
    """Two tensors for 5 steps, a third added by add_param_group, 3 steps more; the placement before
    the add and after it."""
    kw = dict(lr=0.02, precondition_frequency=3, block_size=4, factor_dtype=torch.float64, fused=False)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(make(torch.randn(s, dtype=torch.float64, generator=gen))) for s in shapes]
    opt = SOAP(params[:2], **kw, **({"placement": placement} if placement else {}))
    before = None
    gen = torch.Generator().manual_seed(1)
    for t in range(8):
        if t == 5:
            before = opt.stats()["placement"]
            opt.add_param_group({"params": [params[2]]})
        for p in params:
            p.grad = make(torch.randn(p.shape, dtype=torch.float64, generator=gen))
        opt.step()
    got = [p.detach().full_tensor() if isinstance(p, DTensor) else p.detach() for p in params]
    return got, before, opt.stats()["placement"]


def auto_switch_on_add_param_group(world):
    """placement="auto" picks again when add_param_group rebuilds: the state moves across placements."""
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    cases = {  # (10, 4)'s 5-row shards do not take block_size 4: owner; (256, 4) tips auto to fsdp-local
        "to_owner": [(64, 4), (32, 4), (10, 4)],
        "to_fsdp_local": [(64, 4), (8, 16), (256, 4)],
    }
    for name, shapes in cases.items():
        want, _, _ = _add_group_run(lambda t: t.clone(), shapes, placement="single")
        got, before, after = _add_group_run(lambda t: distribute_tensor(t.clone(), mesh, [Shard(0)]), shapes)
        out[name] = [before, after, ds._rel(got, want)]
    return out


def auto_switch_into_hsdp_is_refused(world):
    """owner -> hsdp: hsdp cannot take owner's in-memory state (its row factors are whole tensors, not
    shards); every rank refuses with the same message naming the fix, none waits on the others."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    try:
        _add_group_run(
            lambda t: distribute_tensor(t.clone(), mesh, [Replicate(), Shard(0)]),
            [(64, 4), (8, 16), (256, 4)],
        )
        return {"error": ""}
    except ValueError as error:
        return {"error": str(error)}
