"""What ``--resume`` checks before loading a checkpoint, and what an interrupted run says on its way out.

Fine-tuning's side of pre-training's ``soap_apps.pretrain.resume_check`` (whose key lists,
``Interrupted`` and ``signal_and_exit_code`` it uses). ``check_resume``: a checkpoint fits
only the settings that wrote it (recorded in its ``checkpoints.MARKER``); a change that would break
its state, or be silently undone by it, is named flag by flag in one ConfigError before anything is
loaded (before: AdamW resumed SOAP's state without a word, and --context a size-mismatch traceback).
A finished run resumed has nothing to train: ``NothingToTrain``, which the launchers report.

``stopped``/``report``: Ctrl-C (SIGINT), or SIGTERM turned into the same exception while
``sigterm_as_interrupt`` is active, ends the run where it is without a checkpoint (the ranks could
not agree on one); rank 0 says what was kept and the command that continues (or restarts) the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from soap_apps.config_loader import ConfigError
from soap_apps.finetune.config import FinetuneConfig
from soap_apps.pretrain import resume_check
from soap_apps.pretrain.resume_check import Interrupted

_FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)}
# the weights' shapes (model), the data and its position (counted in batches), the optimizer's state
FIXED = ("model", "init_from", "context", "data", "max_bytes", "eval_fraction", "seed", "batch_size",
         "grad_accum", "optimizer")  # fmt: skip
SOAP_LAYOUT = tuple(k for k in resume_check.SOAP_LAYOUT_KEYS if k in _FIELDS)
# saved in the optimizer's param groups, which loading restores over the flags
RESTORED = ("beta1", "beta2", "eps", "weight_decay")
SOAP_RESTORED = resume_check.SOAP_RESTORED_KEYS
MAY_CHANGE = "--steps, --lr, the schedule, clipping, eval and save cadence may change"


class NothingToTrain(Exception):
    """The checkpoint resumed is at --steps: the run is finished (a normal end, exit 0)."""


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _keys(saved: dict[str, Any], cfg: FinetuneConfig) -> list[tuple[str, bool]]:
    """(key, restored by the checkpoint) for every setting compared on resume."""
    keys = [(k, False) for k in FIXED] + [(k, True) for k in RESTORED]
    if saved.get("optimizer") == cfg.optimizer == "soap":  # SOAP's options mean nothing to AdamW
        keys += [(k, False) for k in SOAP_LAYOUT] + [(k, True) for k in SOAP_RESTORED]
    return keys


def config_differences(saved: dict[str, Any], cfg: FinetuneConfig) -> list[str]:
    """``--flag (saved X, given Y)`` for each compared setting that differs."""
    now = cfg.to_dict()
    out = []
    for key, restored in _keys(saved, cfg):
        if key in saved and saved[key] != now[key]:
            why = "; the checkpoint restores it" if restored else ""
            out.append(f"{_flag(key)} (saved {json.dumps(saved[key])}, given {json.dumps(now[key])}{why})")
    return out


def _family(setup: dict[str, Any]) -> tuple[Any, ...]:
    """What a checkpoint fits: one process and DDP write the same files, FSDP and DeepSpeed their own
    (DeepSpeed's partitions per process), fp16 adds a grad scaler; and every backend's data position
    is counted in per-process batches."""
    backend = setup.get("backend")
    plain = backend in ("single", "ddp")
    # the world size for every backend: the data position is counted in per-process batches
    # (skip_first_batches(step * grad_accum)), so another number of processes replays or skips windows
    world = setup.get("world")
    return ("plain" if plain else backend, world, setup.get("mixed_precision"))


def setup_difference(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """The Accelerate setup's difference from the saved one, where the checkpoint's files depend on it."""
    if not saved or _family(saved) == _family(now):
        return []

    def shown(s: dict[str, Any]) -> str:
        world = s.get("world")
        processes = f"{world} process" + ("" if world == 1 else "es")
        return f"{s.get('backend')}, {processes}, mixed precision {s.get('mixed_precision')}"

    return [f"the Accelerate setup (saved {shown(saved)}; now {shown(now)}): launch with the saved one"]


def check_resume(
    cfg: FinetuneConfig, path: Path, marker: dict[str, Any] | None, setup: dict[str, Any]
) -> None:
    """ConfigError when ``cfg`` or ``setup`` differs from what the checkpoint at ``path`` was saved
    with (its ``marker``) in a setting its state depends on or restores; ConfigError when --steps is
    below its step; NothingToTrain when it is at --steps. A checkpoint without a marker (saved by an
    older version) is loaded as is."""
    if marker is None:
        return
    diffs = setup_difference(marker.get("setup"), setup) + config_differences(marker.get("config", {}), cfg)
    if diffs:
        raise ConfigError(
            f"--resume: the checkpoint {path} was saved with other settings: {', '.join(diffs)}. Pass the "
            f"saved values to resume it ({MAY_CHANGE}), or leave --resume out and pass another "
            "--output-dir to start a new run"
        )
    check_steps(cfg.steps, int(marker["step"]), path)


def check_steps(steps: int, step: int, path: Path) -> None:
    """NothingToTrain when the checkpoint at ``path`` (step ``step``) is at --steps; ConfigError past it."""
    if step == steps:
        raise NothingToTrain(
            f"the checkpoint {path} is at step {step}, which is --steps: the run is finished, nothing to "
            f"train; pass --steps above {step} to train on from it"
        )
    if step > steps:
        raise ConfigError(
            f"--steps {steps} is below the step of the checkpoint being resumed, {path} (step {step}): "
            f"pass --steps above {step} to train on from it"
        )


def stopped(
    stop: KeyboardInterrupt, step: int | None, steps: int, newest: Path | None, is_main: bool
) -> Interrupted:
    """The Interrupted that describes ``stop`` at ``step`` (None: still starting up)."""
    signame, _ = resume_check.signal_and_exit_code(stop)
    where = "during start-up" if step is None else f"after step {step} of {steps}"
    kept = (
        f"the newest complete checkpoint is {newest}"
        if newest
        else "there is no complete checkpoint, so nothing can be resumed"
    )
    return Interrupted(
        signame,
        f"interrupted by {signame} {where} (no checkpoint is written on an interrupt); {kept}",
        is_main,
    )


def command(script: str, argv: list[str], out: Path, resume: bool) -> str:
    """The command that continues (``resume``) or restarts the run: ``argv`` without --output-dir and
    --resume, then ``--output-dir out`` (and ``--resume latest``)."""
    args, skip = [], False
    for arg in argv:
        if skip or arg in ("--output-dir", "--resume"):
            skip = not skip and arg in ("--output-dir", "--resume")
        elif not arg.startswith(("--output-dir=", "--resume=")):
            args.append(arg)
    tail = [script, *args, "--output-dir", str(out), *(["--resume", "latest"] if resume else [])]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"the same accelerate launch command with {shlex.join(tail)}"
    return f"python {shlex.join(tail)}"


def report(stop: Interrupted, script: str, argv: list[str], out: Path, resumable: bool, restart: str) -> None:
    """Rank 0's one line on an interrupt: what was kept and the command to go on with (``restart``:
    what to know before starting again, where nothing can be resumed)."""
    if stop.is_main:
        then = "to continue" if resumable else f"to start again ({restart})"
        line = f"{script}: {stop.message}; {then}: {command(script, argv, out, resumable)}"
        print(line, file=sys.stderr, flush=True)


def script_path(name: str) -> str:
    """The launcher ``name`` as it is best typed from here (relative to the working directory)."""
    path = Path(__file__).resolve().parents[2] / Path(name).name
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive
        return str(path)


def signal_exit(stop: KeyboardInterrupt) -> int:
    """Rank 0's line for an interrupt before the run began; the exit code of a death by that signal."""
    signame, code = resume_check.signal_and_exit_code(stop)
    if os.environ.get("RANK", "0") == "0":
        print(f"finetune: interrupted by {signame} before the run started", file=sys.stderr, flush=True)
    return code
