"""The Accelerate fine-tuning loop: one code path for DDP, FSDP2 and DeepSpeed.

``launch.make_accelerator`` turns what ``accelerate launch`` put in the environment into an
Accelerator (refusing the combinations that would silently train the wrong thing). ``prepare``
builds the data, the model and the optimizer and hands them to ``accelerator.prepare`` in one call
(under FSDP2 Accelerate swaps the optimizer's parameters for sharded DTensors, which SOAP picks up
at its first step). ``train`` runs the loop: ``accumulate`` / ``backward`` / ``clip_grad_norm_`` /
``step`` / ``zero_grad``, with periodic evaluation, ``save_state`` checkpoints (atomic:
``checkpoints.save``) and exact ``--resume`` (checked against the checkpoint's settings first:
``resume.check_resume``). Ctrl-C or SIGTERM ends the run with one line saying what was kept and how
to go on (``resume.report``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from soap_apps import run_lock, schedule, soap_options
from soap_apps.config_loader import ConfigError
from soap_apps.finetune import agreement, checkpoints
from soap_apps.finetune.checkpoints import METRICS, check_output_dir, resume_dir
from soap_apps.finetune.config import FinetuneConfig, parse_args
from soap_apps.finetune.data import Windows, eval_windows, load_bytes, split
from soap_apps.finetune.launch import backend_name, make_accelerator
from soap_apps.finetune.model import build_model, window_losses
from soap_apps.finetune.resume import (
    NothingToTrain,
    check_resume,
    check_steps,
    report,
    script_path,
    signal_exit,
    stopped,
)
from soap_apps.jsonl import JsonlLog, records_through
from soap_apps.pretrain.rank_agreement import agreed
from soap_apps.pretrain.resume_check import (
    Interrupted,
    interrupt_in,
    interrupts_held,
    sigterm_as_interrupt,
)
from soap_apps.quiet import (
    no_shared_tensor_note,
    no_untested_optimizer_banner,
)
from soap_dist import SOAP


def soap_kwargs(cfg: FinetuneConfig) -> dict[str, Any]:
    """SOAP's keyword arguments from the flags (also what the HF Trainer route passes)."""
    return soap_options.soap_kwargs(
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        shampoo_beta=cfg.shampoo_beta,
        precondition_frequency=cfg.precondition_frequency,
        max_precond_dim=cfg.max_precond_dim,
        merge_dims=cfg.merge_dims,
        precondition_1d=cfg.precondition_1d,
        normalize_grads=cfg.normalize_grads,
        block_size=cfg.block_size,
        refresh_delay=cfg.refresh_delay,
        fused={"auto": None, "on": True, "off": False}[cfg.fused],
    )


def make_optimizer(cfg: FinetuneConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SOAP or AdamW over two groups: matrices with weight decay, vectors (biases, norms) without.

    Plain parameter lists (not named ones): DeepSpeed replaces a group's params with one flat
    partition, which a per-parameter name list would no longer match.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return SOAP(groups, **soap_kwargs(cfg))


def unwrap_optimizer(optimizer: Any) -> Any:
    """The user's optimizer inside Accelerate's (and DeepSpeed's) wrappers."""
    for _ in range(8):
        if isinstance(optimizer, (SOAP, torch.optim.AdamW)) or not hasattr(optimizer, "optimizer"):
            return optimizer
        optimizer = optimizer.optimizer
    return optimizer


def lr_at(cfg: FinetuneConfig, step: int) -> float:
    """The lr of 0-based step ``step``: ``soap_apps.schedule.lr_at`` (pre-training's) at ``step + 1``.

    Set on the param groups before each step: nothing to checkpoint, and no scheduler for
    Accelerate to step once per process.
    """
    return schedule.lr_at(
        step + 1,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.steps,
        min_lr_ratio=cfg.min_lr_ratio,
    )


class Progress:
    """Steps done and bytes seen, saved by ``accelerator.save_state`` (register_for_checkpointing)."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.running: int | None = None  # steps done once the loop began (not saved): for an interrupt

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


def check_inputs(
    cfg: FinetuneConfig, find_resume: Callable[[FinetuneConfig], Path | None] = resume_dir
) -> Path | None:
    """The paths the run reads, checked before any work: ConfigError naming the flag and the path
    as given (--data, --init-from, --resume). Returns the checkpoint to resume from: ``find_resume``'s
    answer (``resume_dir``; the HF Trainer route passes its own, for its checkpoint-N layout), whose
    FileNotFoundError becomes the ConfigError."""
    for flag, value, what in (
        ("--data", cfg.data, "give a text file or a directory of them"),
        ("--init-from", cfg.init_from, "give the final/ directory a pre-training run wrote (runs/X/final)"),
    ):
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{flag} {value!r} does not exist; {what}")
    try:
        return find_resume(cfg)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None


def _as_float(x: Any) -> float | None:
    if x is None:
        return None
    if hasattr(x, "full_tensor"):  # a DTensor norm (FSDP2)
        x = x.full_tensor()
    return float(x)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[torch.Tensor], accelerator: Any) -> float:
    """Mean held-out loss over every eval window (each rank scores its share; duplicates dropped)."""
    model.eval()
    losses = [accelerator.gather_for_metrics(window_losses(model, ids)) for ids in loader]
    model.train()
    return torch.cat(losses).mean().item()


def prepare(
    cfg: FinetuneConfig, accelerator: Any, data: torch.Tensor
) -> tuple[nn.Module, Any, DataLoader, DataLoader]:
    """Data, model and optimizer, through ``accelerator.prepare`` in one call (FSDP2 needs model and
    optimizer together; DeepSpeed reads its micro-batch size from the DataLoader). ``data``: the
    corpus's bytes (``load_bytes``, read and compared across processes before)."""
    from accelerate.utils import set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    train_ids, eval_ids = split(data, cfg.eval_fraction)
    samples = cfg.steps * cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    train_dl = DataLoader(Windows(train_ids, cfg.context, samples, cfg.seed), batch_size=cfg.batch_size)
    eval_dl = DataLoader(eval_windows(eval_ids, cfg.context, cfg.eval_windows), batch_size=cfg.batch_size)
    try:
        model = build_model(cfg)  # same seed on every rank, so the same initial weights
    except FileNotFoundError as error:  # --init-from a directory without an export in it
        if not cfg.init_from:
            raise
        raise ConfigError(f"--init-from {cfg.init_from!r}: {error}") from None
    optimizer = make_optimizer(cfg, model)
    with no_untested_optimizer_banner():  # under DeepSpeed: SOAP is not on its list; soap_dist supports it
        prepared = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    if (accumulates := accelerator.gradient_accumulation_steps) != cfg.grad_accum:  # (after DeepSpeed's JSON)
        raise ConfigError(  # else each micro-batch would be a step, or --resume would skip the wrong batches
            f"--grad-accum {cfg.grad_accum}, but the Accelerator accumulates {accumulates} micro-batches "
            "per step (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, accelerate launch --gradient_accumulation_"
            "steps, or a DeepSpeed JSON's gradient_accumulation_steps, 1 if absent): make them agree ('auto')"
        )
    return prepared


def setup(accelerator: Any) -> dict[str, Any]:
    """What a checkpoint's files depend on besides the flags (recorded with it, checked on resume)."""
    return {
        "backend": backend_name(accelerator),
        "world": accelerator.num_processes,
        "mixed_precision": str(accelerator.mixed_precision),
    }


def start_checks(cfg: FinetuneConfig, accelerator: Any, start: Path | None) -> bool:
    """What is checked under the run directory's lock, before the data or the model is built:
    --output-dir is not another run's and, on resume, ``start``'s settings are this run's. Returns
    whether --output-dir holds an interrupted run's leftovers to clear. (Its writability and the
    paths read, ``start`` included, were checked before the lock: ``train``.)"""
    leftovers = check_output_dir(Path(cfg.output_dir), cfg.resume, checkpoints.LEFTOVERS)
    if start is not None:
        check_resume(cfg, start, checkpoints.read_marker(start), setup(accelerator))
    return leftovers


def train(
    cfg: FinetuneConfig,
    accelerator: Any,
    on_prepared: Callable[[nn.Module, torch.optim.Optimizer], None] | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune under ``accelerator``; returns the metric rows (the same on every rank).

    ``on_prepared(model, optimizer)`` is called once after ``accelerator.prepare`` (tests use it to
    look at what the optimizer was handed). Ctrl-C, or SIGTERM under ``sigterm_as_interrupt``, ends
    it with ``Interrupted`` saying what was kept; a finished run resumed with ``NothingToTrain``.
    """
    cfg.validate()
    out = Path(cfg.output_dir or f"runs/finetune-{backend_name(accelerator)}")
    cfg = dataclasses.replace(cfg, output_dir=str(out))

    def inputs() -> Path | None:  # the paths read and the checkpoint to resume from
        checkpoints.check_writable(out)  # before the lock, which writes into it: a bad path is one line
        return check_inputs(cfg)

    start = agreed(inputs)  # refused on one process, refused on all (else they would wait)
    progress = Progress()
    try:
        with run_lock.holding(out, accelerator.is_main_process):
            return _train(cfg, accelerator, progress, on_prepared, start)
    except BaseException as error:  # an interrupt: no collective from here, the other ranks may be anywhere
        if (stop := interrupt_in(error)) is None:
            raise
        newest = checkpoints.newest_complete(out)
        raise stopped(stop, progress.running, cfg.steps, newest, accelerator.is_main_process) from None


def _train(
    cfg: FinetuneConfig,
    accelerator: Any,
    progress: Progress,
    on_prepared: Callable[[nn.Module, torch.optim.Optimizer], None] | None,
    start: Path | None,
) -> list[dict[str, Any]]:
    out = Path(cfg.output_dir)
    refused = leftovers = data = None
    try:
        leftovers = start_checks(cfg, accelerator, start)
        data = load_bytes(cfg.data, cfg.max_bytes)
    except Exception as error:  # (also NothingToTrain: a finished run on one node's own disk only)
        refused = error
    # raises refused, on every process; a gather, so every rank has looked before rank 0 writes
    agreement.check_same_run(cfg, data, start, refused)
    if accelerator.is_main_process and leftovers:
        checkpoints.start_over(out)
    elif accelerator.is_main_process:
        checkpoints.remove_partials(out)
    model, optimizer, train_dl, eval_dl = prepare(cfg, accelerator, data)
    if on_prepared is not None:
        on_prepared(model, optimizer)

    accelerator.register_for_checkpointing(progress)
    if start is not None:
        accelerator.load_state(str(start))
        check_steps(cfg.steps, progress.step, start)  # also for a checkpoint saved without its marker
    log = JsonlLog(out / METRICS, accelerator.is_main_process)  # pre-training's writer too
    # a resumed run drops what the interrupted one wrote past its checkpoint, as pre-training does
    if log.enabled:
        log.replace(records_through(log.path, progress.step))
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        log.write(row)

    record(
        {
            "event": "start",
            "step": progress.step,
            "resumed_from": str(start) if start else None,
            "world": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "config": cfg.to_dict(),
        }
    )
    saved = {"config": cfg.to_dict(), "setup": setup(accelerator)}  # recorded with each checkpoint
    batches = (
        accelerator.skip_first_batches(train_dl, progress.step * cfg.grad_accum)
        if progress.step
        else train_dl
    )
    bar = tqdm(
        total=cfg.steps,
        initial=progress.step,
        disable=not accelerator.is_main_process,
        desc=f"{cfg.optimizer} x{accelerator.num_processes}, loss in nats/byte",
        unit="step",
        dynamic_ncols=True,
    )
    model.train()
    micro: list[torch.Tensor] = []
    tick = time.perf_counter()
    progress.running = progress.step
    try:
        for ids in batches:
            for group in optimizer.param_groups:  # before backward: DeepSpeed steps inside it
                group["lr"] = lr_at(cfg, progress.step)
            with accelerator.accumulate(model):
                loss = window_losses(model, ids).mean()
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            step_loss = accelerator.reduce(torch.stack(micro).mean(), reduction="mean").item()
            micro = []
            progress.step += 1
            progress.tokens += cfg.batch_size * cfg.grad_accum * accelerator.num_processes * cfg.context
            progress.running = progress.step
            now = time.perf_counter()
            row = {
                "step": progress.step,
                "loss": step_loss,
                "lr": lr_at(cfg, progress.step - 1),
                "grad_norm": _as_float(grad_norm),
                "tokens": progress.tokens,
                "step_s": now - tick,
            }
            if progress.step == 1 and isinstance(unwrap_optimizer(optimizer), SOAP):
                row["soap_placement"] = unwrap_optimizer(optimizer).stats().get("placement")
            record(row)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            last = progress.step == cfg.steps
            if (cfg.eval_every and progress.step % cfg.eval_every == 0) or last:
                record({"step": progress.step, "eval_loss": evaluate(model, eval_dl, accelerator)})
            if (cfg.save_every and progress.step % cfg.save_every == 0) or last:
                note = "finetune" if accelerator.is_main_process else None
                with interrupts_held(f"the checkpoint of step {progress.step}", note):
                    with no_shared_tensor_note():  # GPT-2's tied head: dropped from the file, re-tied on load
                        checkpoints.save(accelerator, out, progress.step, saved)
            tick = time.perf_counter()
    finally:
        bar.close()  # before any message: an interrupt's starts on a line of its own
    return rows


def _summary(rows: list[dict[str, Any]]) -> str | None:
    """The one line a finished run ends with (None when it trained no step)."""
    metrics = Path(rows[0]["config"]["output_dir"]) / METRICS  # the start row has the resolved dir
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    curve = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not curve:
        return None
    return (
        f"done: steps {curve[0][0]}-{curve[-1][0]}, train loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f}, "
        f"held-out loss {evals[-1]:.4f} nats/byte; metrics in {metrics}"
    )


SCRIPT = "launchers/finetune.py"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``launchers/finetune.py``: parse flags, build the Accelerator, train, report."""
    cfg = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    with sigterm_as_interrupt():
        try:
            accelerator = make_accelerator(cfg)
            rows = train(cfg, accelerator)
        except (ConfigError, FileExistsError, FileNotFoundError) as error:
            # bad input (a path, a used --output-dir, too little data, settings that differ from the
            # checkpoint's): one line that says what to do, no traceback; exit 2 as for a bad flag
            print(f"{SCRIPT}: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except NothingToTrain as done:  # a finished run resumed: say so, exit 0
            if accelerator.is_main_process:
                print(f"{SCRIPT}: {done}", flush=True)
            accelerator.end_training()
            return []
        except Interrupted as stop:  # Ctrl-C or SIGTERM during the run: rank 0 says what was kept
            out = Path(cfg.output_dir or f"runs/finetune-{backend_name(accelerator)}")
            restart = f"a fresh run reuses {out}: it holds no checkpoint"
            report(
                stop, script_path(SCRIPT), argv, out, checkpoints.newest_complete(out) is not None, restart
            )
            raise SystemExit(stop.exit_code) from None
        except KeyboardInterrupt as stop:  # before the Accelerator was built
            raise SystemExit(signal_exit(stop)) from None
    if accelerator.is_main_process and (line := _summary(rows)):
        print(line)
    accelerator.end_training()
    return rows
