"""DeepSpeed ZeRO scenarios, run inside one spawned 2-rank gloo group (start-up is the cost).

The model's loss is sum_i <W_i, C_i>, so each gradient is exactly C_i: the C_i are small
multiples of 1/8, and every sum DeepSpeed forms of them (across ranks, across micro-batches, in
any order) is exact in fp32 and bf16. The one-process reference therefore sees bitwise the same
global gradient, and any difference left is SOAP's own (the order partial statistics are summed
in). Rank r's micro-batch k of step t uses C from a seeded stream, so the global batch is known.
"""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (30, 7) is an "embedding" whose 30 rows exceed max_precond_dim=20 (no row factor, single-row
# units); (6,) is a bias (AdamW path); (17, 7) and (9, 5) have row factors in 4-row blocks; two
# (5, 5) share a stack. At world 2 the flat partitions cut (17, 7) mid-row inside a row block under
# stages 1/2, and most matrices under stage 3 (the tests check that they do).
SHAPES = [(30, 7), (6,), (17, 7), (9, 5), (16, 4), (5, 5), (5, 5)]
SOAP_PARAMS = dict(
    lr=0.02, precondition_frequency=3, max_precond_dim=20, weight_decay=0.01, block_size=4, fused=False
)
STEPS = 7
WORLD = 2


class Sum(torch.nn.Module):
    """loss = sum_i <W_i, C_i>: the gradient of W_i is exactly C_i. Parameters sit on the module
    itself so that ZeRO-3's forward hooks gather them."""

    def __init__(self, shapes=SHAPES, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.names = []
        for i, s in enumerate(shapes):
            name = f"w{i}"
            setattr(self, name, torch.nn.Parameter(torch.randn(s, generator=gen)))
            self.names.append(name)

    def forward(self, cs: list[torch.Tensor]) -> torch.Tensor:
        ws = [getattr(self, n) for n in self.names]
        return sum((w * c.to(w.dtype)).sum() for w, c in zip(ws, cs, strict=True))


def coefficients(step: int, rank: int, micro: int, shapes=SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + micro + 1)
    return [torch.randint(-8, 9, s, generator=gen).float() / 8 for s in shapes]


def global_grads(step: int, gas: int, shapes=SHAPES) -> list[torch.Tensor]:
    """Mean over ranks and micro-batches of the C's: exact in fp32 (sums of multiples of 1/8)."""
    total = [torch.zeros(s) for s in shapes]
    for r in range(WORLD):
        for k in range(gas):
            for t, c in zip(total, coefficients(step, r, k, shapes), strict=True):
                t += c
    return [t / (WORLD * gas) for t in total]


def reference(steps: int, gas: int, shapes=SHAPES, bf16: bool = False, **kw) -> list[torch.Tensor]:
    """One process, fp32, on the global gradients; under bf16 from the bf16-rounded initial weights
    (DeepSpeed's fp32 master weights start from the bf16 model)."""
    from soap_dist import SOAP

    model = Sum(shapes)
    if bf16:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    kw = {k: v for k, v in kw.items() if k != "placement"}  # one process: placement "single"
    opt = SOAP(model.parameters(), **{**SOAP_PARAMS, **kw})
    for t in range(steps):
        for p, g in zip(model.parameters(), global_grads(t, gas, shapes), strict=True):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def ds_config(stage: int, gas: int = 1, bf16: bool = False, soap: dict | None = None, **zero) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": stage, **zero},
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "SOAP", "params": {**SOAP_PARAMS, **(soap or {})}},
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0: the reference does not clip
    }


def build(
    stage: int, gas: int = 1, bf16: bool = False, zero_init: bool = False, soap=None, shapes=SHAPES, **zero
):
    import deepspeed

    import soap_dist.deepspeed as sdd

    cfg = ds_config(stage, gas, bf16, soap, **zero)
    if zero_init:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = Sum(shapes)
    else:
        model = Sum(shapes)
    engine, opt, _, _ = sdd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine, model


def train(engine, rank: int, first: int, steps: int, gas: int, shapes=SHAPES) -> None:
    for t in range(first, first + steps):
        for k in range(gas):
            loss = engine(coefficients(t, rank, k, shapes))
            engine.backward(loss)
            engine.step()


def full_params(engine, model) -> list[torch.Tensor]:
    """The fp32 master weights, whole (ZeRO-0: the parameters themselves)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if engine.zero_optimization_stage() == 0:
        if not engine.bfloat16_enabled():
            return [p.detach().clone().float() for p in model.parameters()]
        # bf16 stage 0: SOAP steps DeepSpeed's fp32 master copies (full shapes, in model order)
        return [p.detach().clone() for g in soap_of(engine).param_groups for p in g["params"]]
    return [safe_get_full_fp32_param(p).detach().clone() for p in model.parameters()]


def soap_of(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def mid_row_splits(soap) -> list[str]:
    """Names of preconditioned-row matrices whose partitions cut them mid-row (placement 'zero')."""
    zero = soap._zero
    if zero is None:
        return []
    out = []
    for frags in zero.part.fragments:
        for f in frags:
            lay = zero.layouts[f.param]
            width = lay.shape[1] if len(lay.shape) > 1 else 1
            cut = f.start % width or (f.start + f.numel) % width
            if len(lay.shape) > 1 and cut and f.numel < lay.shape[0] * width:
                out.append(f"{lay.name}{'(row factor)' if lay.preconditioned[0] else ''}")
    return sorted(set(out))


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b, strict=True))


# ----- scenarios -----
def scenario_stage(
    rank: int, stage: int, gas: int, bf16: bool = False, zero_init: bool = False, soap_kw=None, **zero
):
    engine, model = build(stage, gas, bf16, zero_init, soap_kw, **zero)
    train(engine, rank, 0, STEPS - 1, gas)
    soap = soap_of(engine)
    moved, expected = _row_exchanges(soap)  # the last step's, and what gradients in + updates out make
    train(engine, rank, STEPS - 1, 1, gas)
    got = full_params(engine, model)
    stats = soap.stats()
    return {
        "fragments": [[(f.param, f.start, f.numel) for f in fr] for fr in soap._zero.part.fragments]
        if soap._zero
        else [],
        "error": rel(got, reference(STEPS, gas, bf16=bf16, **(soap_kw or {}))),
        "placement": stats.get("placement"),
        "mid_row": mid_row_splits(soap),
        "global_steps": engine.global_steps,
        "engine_steps_seen": [int(s) for s in (soap._zero.engine.steps if soap._zero else [])],
        "flats": len(soap._zero.part.flats) if soap._zero else 0,
        "moved": moved,
        "expected_moved": expected,
    }


def _row_exchanges(soap) -> tuple[list[int], int]:
    """Record the elements each all_to_all of rows sends from now on; and the elements one step must
    send: every piece held away from its home sends its gradient, and gets its update back."""
    zero = soap._zero
    if zero is None:
        return [], 0
    moved: list[int] = []
    swap = zero.exchange.swap_pieces

    def counting(send, send_counts, recv_counts, over=None):
        moved.append(send.numel())
        return swap(send, send_counts, recv_counts, over)

    zero.exchange.swap_pieces = counting
    me = zero.part.rank
    expected = 0
    for route, crossing in zero.routes:
        if crossing:
            expected += sum(p.numel for d, pieces in enumerate(route.send) if d != me for p in pieces)
            expected += sum(p.numel for s, pieces in enumerate(route.recv) if s != me for p in pieces)
    return moved, expected


# (200, 7) has no row factor (200 > max_precond_dim) and outweighs every other matrix: under
# "placement": "owner" it stays spread over the ranks (owner_layout.spread_params), on zero's rows.
SPREAD_SHAPES = [(200, 7), (6,), (17, 7), (9, 5)]


def scenario_owner_spread(rank: int, stage: int, gas: int, soap_kw: dict, **zero):
    """Placement owner with a spread parameter equals one process, and names the spread one."""
    engine, model = build(stage, gas, soap=soap_kw, shapes=SPREAD_SHAPES, **zero)
    train(engine, rank, 0, STEPS, gas, SPREAD_SHAPES)
    soap = soap_of(engine)
    stats = soap.stats()
    return {
        "error": rel(full_params(engine, model), reference(STEPS, gas, SPREAD_SHAPES, **soap_kw)),
        "placement": stats.get("placement"),
        "spread": stats.get("spread_params"),
    }


def scenario_checkpoint(rank: int, stage: int, directory: str, soap_kw=None, shapes=SHAPES):
    engine, model = build(stage, soap={**(soap_kw or {}), "collective_timeout": 30}, shapes=shapes)
    # A save on rank 0 alone before the first step (the HF Trainer's pattern), held on every rank first
    soap_of(engine).hold_state_dict(keep=rank == 0)
    saved_alone = sorted(soap_of(engine).state_dict()) if rank == 0 else None
    train(engine, rank, 0, 4, 1, shapes)  # past the refresh at step 3
    engine.save_checkpoint(directory, tag="t4")
    train(engine, rank, 4, 4, 1, shapes)
    straight = full_params(engine, model)
    again, model2 = build(stage, soap=soap_kw, shapes=shapes)
    again.load_checkpoint(directory, tag="t4")
    train(again, rank, 4, 4, 1, shapes)
    resumed = full_params(again, model2)
    return {
        "bitwise": all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True)),
        "spread": soap_of(again).stats().get("spread_params"),
        "saved_alone": saved_alone,
    }


def scenario_refused_load(rank: int, stage: int):
    """A state that does not fit on one rank only (its partition's last parameter): every rank
    refuses it, and nothing was copied on any rank (ZeRO loads in place)."""
    import copy

    engine, _ = build(stage)
    train(engine, rank, 0, 2, 1)
    soap = soap_of(engine)
    early = copy.deepcopy(soap.state_dict())
    train(engine, rank, 2, 3, 1)
    before = copy.deepcopy(soap.state_dict())
    narrow = copy.deepcopy(early)
    if rank == 1:
        last = max(early["state"])
        moments = early["state"][last]["exp_avg"]
        early["state"][last]["exp_avg"] = torch.zeros(moments.shape[0] + 1, *moments.shape[1:])
        for key in ("factor_0", "basis_0"):  # a row factor narrower than its blocks: fails in the copy
            narrow["state"][last][key] = narrow["state"][last][key][:, :3].clone()
    out = {}
    for name, bad in (("moments", early), ("narrow", narrow)):
        for group in bad["param_groups"]:
            group["lr"] = 0.5
        try:
            soap.load_state_dict(bad)
            error = ""
        except ValueError as refused:
            error = str(refused)
        after = soap.state_dict()
        unchanged = all(
            torch.equal(v, after["state"][i][k])
            for i, entry in before["state"].items()
            for k, v in entry.items()
            if torch.is_tensor(v)
        )
        out[name] = {"error": error, "unchanged": unchanged, "lr": soap.param_groups[0]["lr"]}
    return out


def scenario_bad_configs(rank: int):
    import soap_dist.deepspeed as sdd

    out = {}
    for key, cfg in {
        "unknown": {**ds_config(2), "optimizer": {"type": "SOAP", "params": {"lr": 0.1, "momentum": 0.9}}},
        "offload": ds_config(2, offload_optimizer={"device": "cpu"}),
        "elastic": ds_config(1, elastic_checkpoint=True),
        # deepspeed 0.19.8 leaves the loss unscaled for a client optimizer but unscales its gradients
        "fp16_stage0": {**ds_config(0), "fp16": {"enabled": True}},
        "owner_stage0": ds_config(0, soap={"placement": "owner"}),
        "replicated_stage2": ds_config(2, soap={"placement": "replicated"}),
        "frozen_group_stage1": ds_config(1),
        # valid: DeepSpeed drops an empty group, and reads "auto" as fp16 off
        "empty_group_stage1": ds_config(1),
        "bf16_fp16_auto_stage0": {**ds_config(0, bf16=True), "fp16": {"enabled": "auto"}},
    }.items():
        model = Sum()
        params = model.parameters()
        if key == "frozen_group_stage1":  # DeepSpeed's stages 1-2 fail (IndexError) on such a group
            model.w1.requires_grad_(False)
            rest = [p for n, p in model.named_parameters() if n != "w1"]
            params = [{"params": rest}, {"params": [model.w1]}]
        if key == "empty_group_stage1":
            params = [{"params": list(model.parameters())}, {"params": []}]
        try:
            sdd.initialize(model=model, model_parameters=params, config=cfg)
            out[key] = "no error"
        except (ValueError, TypeError) as err:
            out[key] = str(err)
    # A SOAP reaching the stage-0 fp16 wrapper some other way (Accelerate, the HF Trainer): refused at
    # the wrapper's first call of step(), inside deepspeed.initialize (the CPU has no fp16 engine)
    import deepspeed
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from soap_dist import SOAP

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        FP16_UnfusedOptimizer(SOAP(Sum().half().parameters()), dynamic_loss_scale=True)
        out["fp16_wrapper"] = "no error"
    except ValueError as err:
        out["fp16_wrapper"] = str(err)
    return out


def scenario_foreign_loads(rank: int, stage: int, directory: str):
    """States another setup saved are refused on every rank with a message naming the difference:
    a ``zero`` checkpoint into ``owner``, a state with whole parameters, and DeepSpeed's None."""
    engine, _ = build(stage, soap={"placement": "owner"})
    out = {}
    try:
        engine.load_checkpoint(directory, tag="t4")  # written by scenario_checkpoint under "zero"
        out["placement"] = "no error"
    except ValueError as err:
        out["placement"] = str(err)
    soap = soap_of(engine)
    train(engine, rank, 0, 1, 1)
    whole = {k: v for k, v in soap.state_dict().items() if not k.startswith("zero_")}
    for name, state in (("whole", whole), ("none", None)):
        try:
            soap.load_state_dict(state)
            out[name] = "no error"
        except ValueError as err:
            out[name] = str(err)
    return out


def _worker(rank: int, world: int, init: str, jobs, queue) -> None:
    global WORLD
    WORLD = world  # global_grads and the reference average over this many ranks
    try:
        torch.set_num_threads(1)
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", DS_ACCELERATOR="cpu",
        )  # fmt: skip
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
        results = {}
        for name, fn, kwargs in jobs:
            results[name] = globals()[fn](rank, **kwargs)
        queue.put((rank, results, None))
    except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(jobs: list[tuple[str, str, dict]], world: int = WORLD) -> list[dict]:
    """Run named scenarios on ``world`` ranks; returns each rank's {name: result}."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, init, jobs, queue)) for r in range(world)]
        for p in procs:
            p.start()
        out: dict[int, dict] = {}
        errors = []
        for _ in procs:
            rank, results, error = queue.get(timeout=600)
            if error:
                errors.append(f"rank {rank}:\n{error}")
            out[rank] = results
        for p in procs:
            p.join(timeout=60)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [out[r] for r in range(world)]


def scenario_client_instance(rank: int, stage: int):
    """A SOAP instance handed to deepspeed.initialize directly (as Accelerate and the HF Trainer do):
    found at its first call, no soap_dist.deepspeed.initialize involved."""
    import deepspeed

    import soap_dist.deepspeed as sdd
    from soap_dist import SOAP

    sdd.disable_shm_comm()
    model = Sum()
    cfg = {k: v for k, v in ds_config(stage).items() if k != "optimizer"}
    cfg["zero_allow_untested_optimizer"] = True
    opt = SOAP(model.parameters(), **SOAP_PARAMS)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    train(engine, rank, 0, STEPS, 1)
    return {
        "error": rel(full_params(engine, model), reference(STEPS, 1)),
        "placement": opt.stats()["placement"],
    }
