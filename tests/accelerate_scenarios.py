"""The launcher's loop under Accelerate DDP, FSDP2 and DeepSpeed ZeRO-2, in one spawned 2-process group.

Start-up dominates the cost of a 2-process run, so one gloo group runs, one after the other, with a
fresh Accelerator each (``AcceleratorState._reset_state``; the process group stays): DDP for STEPS
steps (saving at SAVE_AT), DDP resumed from that checkpoint, then the same two under FSDP2 and under
DeepSpeed ZeRO-2.

DDP and ZeRO-2 use the launcher's own ``make_accelerator`` with the environment ``accelerate launch``
would give it (for ZeRO-2: configs/accelerate/ds_zero2.json). FSDP2 is a TEST-ONLY DEVICE: on CPU,
Accelerate 1.15 ignores the FSDP plugin (cpu=True gives DDP; without it each process trains alone),
so ``fsdp2_accelerator`` overrides Accelerate's state to FSDP after construction. The launcher
itself never does this, and on GPUs no override is needed.

Each rank writes its results as JSON to ``<workdir>/rank<r>.json``; exceptions are recorded there too.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

STEPS, SAVE_AT = 6, 3
REPO = Path(__file__).resolve().parents[1]


def small_config(output_dir: str, **overrides):
    from soap_apps.finetune.config import FinetuneConfig

    base = dict(
        steps=STEPS,
        batch_size=4,
        context=64,
        max_bytes=200_000,
        eval_every=SAVE_AT,
        eval_windows=32,
        save_every=SAVE_AT,
        fused="off",
        precondition_frequency=2,
        output_dir=output_dir,
        threads=1,
    )
    return FinetuneConfig(**{**base, **overrides})


def ddp_accelerator(cfg):
    """What launchers/finetune.py builds under ``accelerate launch`` with configs/accelerate/ddp.yaml."""
    from datetime import timedelta

    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    from soap_apps.finetune.launch import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    # the first Accelerator creates the process group: a short timeout turns a hang into an error
    handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=120))]
    return make_accelerator(cfg, kwargs_handlers=handlers)


def fsdp2_accelerator(fsdp_version: int = 2, grad_accum: int = 1):
    """An Accelerator forced into FSDP mode on CPU (test-only; see the module docstring)."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per run
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp_version, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )
    accelerator = Accelerator(
        cpu=True,
        fsdp_plugin=plugin,
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    # The override: Accelerate put MULTI_CPU (DDP) here and dropped the plugin.
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def _observer(seen: dict):
    """An ``on_prepared`` hook recording what the optimizer was handed after accelerator.prepare."""

    def look(model, optimizer) -> None:
        from torch.distributed.tensor import DTensor, Shard

        from soap_apps.finetune.train import unwrap_optimizer

        params = [p for g in optimizer.param_groups for p in g["params"]]
        seen["n_params"] = len(params)
        seen["all_dtensor"] = all(isinstance(p, DTensor) for p in params)
        seen["all_shard0"] = all(
            isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),) for p in params
        )
        seen["model_params_are_optimizer_params"] = {id(p) for p in model.parameters()} == {
            id(p) for p in params
        }
        seen["soap"] = unwrap_optimizer(optimizer)

    return look


def _full_and_resumed(workdir: Path, make_accelerator, **overrides) -> dict:
    """STEPS steps saving at SAVE_AT, then a fresh run resumed from that checkpoint."""
    from soap_apps.finetune.train import train

    seen: dict = {}
    from soap_apps.finetune.launch import backend_name

    cfg = small_config(str(workdir / "full"), **overrides)
    accelerator = make_accelerator(cfg)
    seen["backend"] = backend_name(accelerator)  # the default --output-dir's runs/finetune-<backend>
    full = train(cfg, accelerator, on_prepared=_observer(seen))
    soap = seen.pop("soap")
    stats = soap.stats()
    checkpoint = workdir / "full" / "checkpoints" / f"step_{SAVE_AT}"
    cfg = small_config(str(workdir / "resumed"), resume=str(checkpoint), **overrides)
    resumed = train(cfg, make_accelerator(cfg))
    return {
        **seen,
        "soap_type": type(soap).__name__,
        "placement": stats["placement"],
        "world": stats["world"],
        "full": full,
        "resumed": resumed,
    }


def trainer_run(workdir: Path) -> dict:
    """The HF Trainer route, saving at SAVE_AT, then a fresh Trainer resumed from there. Under DDP the
    Trainer calls SOAP's (collective) state_dict() on the saving rank only: without the route's
    save_callback, the save waited for the other rank until collective_timeout. Under DeepSpeed it
    saves through the engine, on every rank, and the callback must stay out of the way."""
    from accelerate.state import AcceleratorState
    from transformers import TrainerCallback

    from soap_apps.finetune.hf import build_trainer

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    def run(out: Path, resume: str | None) -> tuple[list[float], int, tuple[float, float]]:
        AcceleratorState._reset_state(reset_partial_state=True)
        # 13 held-out windows in batches of 4 over 2 ranks: Accelerate repeats 3 to fill the last batch
        cfg = small_config(str(out), eval_every=0, eval_windows=13, resume=resume)
        trainer = build_trainer(cfg, disable_tqdm=True)
        counter = CountSteps()
        trainer.add_callback(counter)
        trainer.train(resume_from_checkpoint=resume)
        held_out = trainer.evaluate()["eval_loss"]
        ids = torch.stack([trainer.eval_dataset[i]["input_ids"] for i in range(len(trainer.eval_dataset))])
        with torch.no_grad():  # the oracle: every target of the 13 windows, once
            logits = trainer.model(ids).logits[:, :-1].float()
            oracle = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return losses, counter.steps, (held_out, oracle.item())

    full, _, held_out = run(workdir / "full", None)
    checkpoint = workdir / "full" / f"checkpoint-{SAVE_AT}"
    resumed, stepped, _ = run(workdir / "resumed", str(checkpoint))
    saved = sorted(p.name for p in checkpoint.iterdir())
    return {"full": full, "resumed": resumed, "resumed_steps": stepped, "saved": saved, "held_out": held_out}


def zero2_accelerator(cfg):
    """What launchers/finetune.py builds under ``accelerate launch`` with deepspeed_zero2.yaml."""
    from accelerate.state import AcceleratorState

    from soap_apps.finetune.launch import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.pop("ACCELERATE_USE_FSDP", None)  # set by the FSDP2 scenario's Accelerator
    os.environ.update(
        ACCELERATE_USE_DEEPSPEED="true",
        ACCELERATE_DEEPSPEED_CONFIG_FILE=str(REPO / "configs" / "accelerate" / "ds_zero2.json"),
    )
    return make_accelerator(cfg)


SCENARIOS = {
    # DDP with 2 micro-batches per step: no_sync, and resuming mid-stream in micro-batches
    "ddp": lambda workdir: _full_and_resumed(workdir / "ddp", ddp_accelerator, grad_accum=2),
    "trainer_ddp": lambda workdir: trainer_run(workdir / "trainer_ddp"),
    # FSDP2 with 2 micro-batches per step too: Accelerate's accumulate() under FSDP2 (no reduce-scatter
    # but on the last micro-batch), and the resume's skip
    "fsdp2": lambda workdir: _full_and_resumed(
        workdir / "fsdp2", lambda cfg: fsdp2_accelerator(grad_accum=cfg.grad_accum), grad_accum=2
    ),
    "zero2": lambda workdir: _full_and_resumed(workdir / "zero2", zero2_accelerator),  # sets env
    "trainer_zero2": lambda workdir: trainer_run(workdir / "trainer_zero2"),  # under zero2's env
}


def _worker(rank: int, world: int, port: int, workdir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    out: dict = {}
    for name, scenario in SCENARIOS.items():
        tick = time.perf_counter()
        try:
            out[name] = scenario(Path(workdir))
        except Exception:  # recorded for the test to show
            out[name] = {"exception": traceback.format_exc()}
        out[name]["seconds"] = time.perf_counter() - tick
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(out, default=str))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has written its results
    os._exit(0)  # no group teardown: gloo's has aborted a process after its results were saved


def run(workdir: str, world: int = 2) -> list[dict]:
    """Spawn ``world`` ranks on a free port; return each rank's results."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, workdir), nprocs=world, join=True)
    return [json.loads(Path(workdir, f"rank{r}.json").read_text()) for r in range(world)]
