"""What ``--resume`` checks before loading a checkpoint, and what an interrupted run says on its way out.

``check_resume_config``: a checkpoint fits only the configuration that wrote it. The run directory's
``config.yaml`` (written by rank 0 at every start) is compared with this run's configuration, and
every key that differs among those the checkpoint depends on is named in one ConfigError, before
torch.distributed.checkpoint (or DeepSpeed) would stop with a size mismatch or a missing key deep in
its own traceback. Keys the loop reads afresh at every step (``train.steps``, the log, eval and
checkpoint cadence, ``optim.lr``, ``schedule.*``, ``train.threads``, the parallel layout, ...) may
change. Every rank reads the same file, so every rank decides the same.

``Progress`` and ``Interrupted``: Ctrl-C (SIGINT), or SIGTERM turned into the same exception by the
launcher's handler (``Terminated``), ends the run where it is, without a checkpoint (the ranks could
not agree on one); rank 0 then prints one line: the step, the newest complete checkpoint and the
command that continues the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soap_apps.pretrain import checkpoint
from soap_apps.pretrain.config import Config, ConfigError, load_config

CONFIG_FILE = "config.yaml"
CORPUS_FILE = "corpus.txt"  # the training tokens' fingerprint (rank_agreement.tokens_fingerprint)

# the checkpoint's tensors (their names and shapes) or its data position depend on these
SHAPE_KEYS = ("optim.name", "data.path", "data.eval_fraction", "train.seed")
# SOAP's state layout: the factors' shapes and which tensors exist (refresh_delay adds pending_* keys,
# refresh_schedule="staggered" refresh_phase)
SOAP_LAYOUT_KEYS = (
    "max_precond_dim",
    "merge_dims",
    "precondition_1d",
    "block_size",
    "refresh_delay",
    "refresh_schedule",
)
# saved in the optimizer's param_groups, which loading restores over the configured values
RESTORED_KEYS = ("betas", "eps", "weight_decay")
SOAP_RESTORED_KEYS = ("shampoo_beta", "precondition_frequency", "normalize_grads")

MAY_CHANGE = (
    "keys such as train.steps, the log, eval and checkpoint cadence, optim.lr and schedule.* may change "
    "on resume"
)


def _value(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _keys(saved: Config, now: Config) -> tuple[list[str], list[str]]:
    """The config keys compared on resume: (the checkpoint depends on them, the checkpoint restores them)."""
    fixed = [f"model.{key}" for key in saved.to_dict()["model"]] + list(SHAPE_KEYS)
    restored = [f"optim.{key}" for key in RESTORED_KEYS]
    if saved.optim.name == now.optim.name == "soap":  # SOAP's options mean nothing to AdamW
        fixed += [f"optim.{key}" for key in SOAP_LAYOUT_KEYS]
        restored += [f"optim.{key}" for key in SOAP_RESTORED_KEYS]
    return fixed, restored


def config_differences(saved: Config, now: Config) -> tuple[list[str], list[str]]:
    """``key (saved X, now Y)`` for each compared key that differs, split as ``_keys`` splits them."""
    old, new = saved.to_dict(), now.to_dict()

    def diffs(keys: list[str]) -> list[str]:
        out = []
        for key in keys:
            section, _, name = key.partition(".")
            if old[section][name] != new[section][name]:
                out.append(f"{key} (saved {_value(old[section][name])}, now {_value(new[section][name])})")
        return out

    fixed, restored = _keys(saved, now)
    return diffs(fixed), diffs(restored)


def check_resume_config(cfg: Config, run_dir: Path, is_main: bool = True) -> None:
    """ConfigError when ``cfg`` differs from ``run_dir``'s config.yaml in a key its checkpoints depend
    on. Skipped without a checkpoint (the run starts afresh) or without config.yaml (older runs); a
    config.yaml this version cannot read is skipped with a warning (the load itself then decides)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file() or not checkpoint.formats_present(run_dir):
        return
    try:
        saved = load_config(path)
    except ConfigError as error:
        if is_main:
            print(
                f"pretrain: warning: --resume: cannot compare with {path} ({error}); loading the checkpoint "
                "as is",
                file=sys.stderr,
                flush=True,
            )
        return
    fixed, restored = config_differences(saved, cfg)
    if not (fixed or restored):
        return
    parts = []
    if fixed:
        parts.append(f"in keys its checkpoints depend on: {', '.join(fixed)}")
    if restored:
        parts.append(
            "in optimizer hyperparameters the checkpoint restores (a new value would be ignored): "
            + ", ".join(restored)
        )
    raise ConfigError(
        f"--resume: this configuration differs from the run's {path} {'; and '.join(parts)}. Resume "
        f"with the saved values, or pass --out another directory to start a new run; {MAY_CHANGE}"
    )


def check_stop_after(stop_after: int | None, latest: int | None, steps: int, run_dir: Path) -> None:
    """ConfigError when ``--stop-after`` is not past the checkpoint being resumed (step ``latest``):
    there would be nothing to train (a finished run resumed with ``--stop-after train.steps`` is let
    through: it reports its losses)."""
    if stop_after is None or latest is None or stop_after > latest or stop_after == latest == steps:
        return
    raise ConfigError(
        f"--stop-after {stop_after} is not past the checkpoint being resumed, "
        f"{checkpoint.step_dir(run_dir, latest)} (step {latest}): pass --stop-after a step in "
        f"[{latest + 1}, {steps}] (train.steps), or leave it out"
        if latest < steps
        else f"--stop-after {stop_after} is before the checkpoint being resumed, "
        f"{checkpoint.step_dir(run_dir, latest)} (step {latest}, the run is finished): leave --stop-after out"
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's preemption; torchrun forwards it), raised by the launcher's handler so that
    it ends the run the way Ctrl-C does."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` (a KeyboardInterrupt) inside the block, so that a preempted run
    ends like one stopped with Ctrl-C; the previous handler is back afterwards. Signals reach the
    main thread only: elsewhere (a launcher called from a thread) nothing is installed. The
    pre-training and both fine-tuning launchers run under it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _interrupt_for(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


# Signals this soon after the one held are copies of it: the deepspeed launcher's ranks share the
# terminal's process group and get its Ctrl-C, then the launcher's SIGTERM; a scheduler may signal
# torchrun and its workers alike, and torchrun forwards it too.
COPIES_WITHIN_S = 2.0


@contextlib.contextmanager
def interrupts_held(what: str, note: str | None) -> Iterator[None]:
    """Ctrl-C or SIGTERM during ``what`` (a checkpoint being written, old ones being pruned) waits
    for the block to finish and is raised right after it, so that no save or deletion is cut short
    mid-file: a checkpoint due at the interrupted step is then kept, and no half-written DCP writer
    is left for the garbage collector (torch 2.15 prints an "Exception ignored" traceback for one).
    Another signal within ``COPIES_WITHIN_S`` is a copy of the first and ignored; one later raises
    at once. Should the block raise anyway (a peer gone from the save's collectives), the held
    interrupt is what propagates, from that error. ``note``: the program's name for the one line that
    says so on stderr (rank 0), None to stay quiet. Only signals that would raise an interrupt here
    are held (SIGINT not ignored; SIGTERM under ``sigterm_as_interrupt``), and only on the main
    thread. The ranks enter and leave a save together, within a millisecond; a rank that got the
    signal just outside the block leaves the others' save to fail, or to wait until the launcher's
    shutdown timeout ends them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raising = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
    held: list[tuple[int, float]] = []  # the first signal, and when it came

    def hold(signum: int, frame: object) -> None:
        now = time.monotonic()
        if held and now - held[0][1] < COPIES_WITHIN_S:
            return
        if held:
            raise _interrupt_for(signum)
        held.append((signum, now))
        if note is not None:  # os.write: print() may be inside a write to the same stream here
            name = signal.Signals(signum).name
            # on a line of its own: rank 0's progress bar may hold the cursor mid-line
            again = f"send it again after {COPIES_WITHIN_S:g} s to stop at once"
            line = f"\n{note}: {name} during {what}: finishing it first ({again})\n"
            try:
                os.write(sys.stderr.fileno(), line.encode())
            except (AttributeError, OSError, ValueError):  # a stream without a descriptor (captured)
                sys.stderr.write(line)

    previous = {s: signal.getsignal(s) for s in raising}
    swapped = [s for s in raising if previous[s] is raising[s]]
    for s in swapped:
        signal.signal(s, hold)
    try:
        yield
    except BaseException as error:
        if held and not isinstance(error, KeyboardInterrupt):
            raise _interrupt_for(held[0][0]) from error
        raise
    finally:
        for s in swapped:
            signal.signal(s, previous[s])
    if held:
        raise _interrupt_for(held[0][0])


def signal_and_exit_code(stop: KeyboardInterrupt) -> tuple[str, int]:
    """The signal behind an interrupt, and the exit code of a death by it."""
    return ("SIGTERM", 143) if isinstance(stop, Terminated) else ("SIGINT", 130)


def interrupt_in(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt behind ``error``: itself, or the one torch.distributed.checkpoint wrapped
    into a CheckpointException (it catches BaseException) when the interrupt came during a save or a
    load; None when ``error`` is something else."""
    seen: list[BaseException] = []
    todo = [error]
    while todo and len(seen) < 20:
        e = todo.pop()
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.append(e)
        failures = getattr(e, "failures", None)
        todo += [f[0] for f in failures.values()] if isinstance(failures, dict) else []
        todo += [c for c in (e.__cause__, e.__context__) if c is not None and c not in seen]
    return None


def newest_checkpoint(run_dir: Path, deepspeed: bool) -> Path | None:
    """The newest complete checkpoint under ``run_dir``: DCP's newest step_N with its .metadata, or
    the one DeepSpeed's ``latest`` names (written once a save completed); None without one."""
    if not deepspeed:
        steps = checkpoint.checkpoint_steps(run_dir)
        return checkpoint.step_dir(run_dir, steps[-1]) if steps else None
    try:
        tag = checkpoint.deepspeed_latest(run_dir)
    except OSError:  # on the way out of an interrupt: say there is none rather than fail
        return None
    root = run_dir / checkpoint.CHECKPOINTS
    return root / tag if tag and (root / tag).is_dir() else None


class Interrupted(Exception):
    """The run was interrupted (SIGINT or SIGTERM) on this rank; ``message`` says what was kept."""

    def __init__(self, signame: str, message: str, is_main: bool) -> None:
        super().__init__(message)
        self.signame, self.message, self.is_main = signame, message, is_main
        self.exit_code = 128 + (signal.SIGTERM if signame == "SIGTERM" else signal.SIGINT)


@dataclass
class Progress:
    """Where the run is, kept up to date by the loop so that an interrupt can say it."""

    run_dir: Path
    total_steps: int
    deepspeed: bool = False
    step: int | None = None  # the step being trained (None: still starting up)
    closers: list[Any] = field(default_factory=list)  # Metrics to close on an interrupt

    def interrupted(self, stop: KeyboardInterrupt, is_main: bool) -> Interrupted:
        """Close the metrics (no plot, no collective) and describe the interrupt ``stop``."""
        for metrics in self.closers:
            metrics.close(plot=False)
        signame, _ = signal_and_exit_code(stop)
        where = "during start-up" if self.step is None else f"at step {self.step} of {self.total_steps}"
        newest = newest_checkpoint(self.run_dir, self.deepspeed)
        kept = f"the newest complete checkpoint is {newest}" if newest else "there is no complete checkpoint"
        message = f"interrupted by {signame} {where} (no checkpoint is written on an interrupt); {kept}"
        return Interrupted(signame, message, is_main)


def resume_command(script: str, argv: list[str], out: Path, distributed: bool) -> str:
    """The command that continues a run: the launcher's arguments ``argv`` with ``--out out`` and
    ``--resume`` (and without the deepspeed launcher's ``--local_rank``)."""
    with_value, flags = ("--out", "--local_rank", "--local-rank"), ("--resume",)
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in with_value:
            skip = True
        elif arg not in flags and not arg.startswith(tuple(f"{flag}=" for flag in with_value)):
            args.append(arg)
    command = shlex.join([script, *args, "--out", str(out), "--resume"])
    return f"the same torchrun (or deepspeed) command with {command}" if distributed else f"python {command}"


def check_resume_corpus(run_dir: Path, fingerprint: str) -> None:
    """ConfigError when the run's checkpoints were trained on other tokens than this run would read
    (a --data corpus edited since, or another one at the same path): a resume trained on the new ones
    silently. Skipped without a checkpoint or without the run's CORPUS_FILE (older runs)."""
    path = run_dir / CORPUS_FILE
    if not path.is_file() or not checkpoint.formats_present(run_dir):
        return
    saved = path.read_text().strip()
    if saved != fingerprint:
        raise ConfigError(
            f"--resume: the training tokens differ from those the run's checkpoints were trained on "
            f"(saved: {saved}; now: {fingerprint}): the corpus at data.path changed since; resume with "
            "the corpus as it was, or pass --out another directory to start a new run"
        )
