"""Checkpoints through torch.distributed.checkpoint (DCP): model, optimizer, step, data position, RNG.

Layout: ``<run>/checkpoints/step_<N>/`` is one DCP checkpoint, complete once its ``.metadata``
exists (DCP writes it last). Model and optimizer state go through ``get_state_dict`` /
``set_state_dict``, so they are keyed by parameter name and sharded DTensor state is resharded on
load. ``train`` holds the step and the data sampler's position (identical on every rank);
``rng_rank<r>`` holds each rank's RNG states under its own key, so DCP does not mistake them for
replicated values and keep one rank's copy.

A checkpoint is loaded into a freshly built model and optimizer whose parameters have no ``.grad``:
``get_state_dict`` then creates the optimizer's state with one zero-lr step (for SOAP: the DCP trap
documented in docs/design.md section 5).
"""

from __future__ import annotations

import contextlib
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from soap_apps.pretrain.config import ConfigError
from soap_apps.pretrain.parallel import DistEnv, all_reduce_mean
from soap_apps.run_lock import run_entries, shown_entries

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step_(\d+)$")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step_{step}"


def steps_present(run_dir: Path) -> list[int]:
    """Steps of every ``step_<N>`` directory under ``run_dir``, complete or not, ascending."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir())


def checkpoint_steps(run_dir: Path, marker: str = ".metadata") -> list[int]:
    """Steps of the complete checkpoints under ``run_dir`` (those whose ``marker`` file exists), ascending."""
    return [s for s in steps_present(run_dir) if (step_dir(run_dir, s) / marker).exists()]


def deepspeed_latest(run_dir: Path) -> str | None:
    """The tag in DeepSpeed's ``latest`` file under ``run_dir`` (DeepSpeed writes it once a save has
    completed); None when there is no such file."""
    latest = run_dir / CHECKPOINTS / "latest"  # decoded leniently: a damaged file is reported as such
    return latest.read_bytes().decode(errors="replace").strip() if latest.is_file() else None


def formats_present(run_dir: Path) -> list[str]:
    """The checkpoint formats found under ``run_dir``: "DCP" (a complete step_N/.metadata) and/or
    "DeepSpeed" (its ``latest`` file); lets a backend tell another backend's checkpoints from none."""
    found = ["DCP"] if checkpoint_steps(run_dir) else []
    return found + (["DeepSpeed"] if deepspeed_latest(run_dir) is not None else [])


def complete_steps(run_dir: Path, deepspeed: bool = False) -> list[int]:
    """Steps of the checkpoints a resume can load, ascending: DCP's with their ``.metadata``; under
    DeepSpeed, those up to the step its ``latest`` file names (it moves only once a save completed)."""
    if not deepspeed:
        return checkpoint_steps(run_dir)
    tag = deepspeed_latest(run_dir)
    latest = _STEP_DIR.match(tag) if tag is not None else None
    if latest is None:
        return []
    return [s for s in steps_present(run_dir) if s <= int(latest.group(1))]


def prune(run_dir: Path, keep: int | None, env: DistEnv, deepspeed: bool = False) -> None:
    """Keep the newest ``keep`` complete checkpoints (rank 0; after every rank finished saving).

    Only complete checkpoints count: a save cut short (Ctrl-C, a kill) leaves a ``step_<N>`` without
    its ``.metadata``, which no resume can load, so it must never push a complete one out. Such a
    directory older than the newest complete checkpoint is deleted with the pruned ones (it can
    never be loaded); a newer one is left alone (a later save of that step overwrites it).
    """
    if keep is None or not env.is_main:
        return
    complete = complete_steps(run_dir, deepspeed)
    if not complete:
        return
    kept = set(complete[-keep:])
    for step in steps_present(run_dir):
        if step not in kept and step < complete[-1]:
            shutil.rmtree(step_dir(run_dir, step), ignore_errors=True)


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """Without a process group (one process), DCP warns on every save and load that it is "assuming
    the intent is to save/load in a single process" (even with ``no_dist=True``), and its stacklevel
    shows a line of its own wrapper (``return func(*args, **kwargs)``). One process is what the
    launcher intends, so that one warning is dropped; any other warning still shows."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="torch.distributed is (disabled, )?unavailable or uninitialized",
            category=UserWarning,
        )
        yield


def _rng_state(env: DistEnv) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def save(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict[str, Any], env: DistEnv
) -> None:
    """Write one checkpoint (a collective: every rank calls it with the same ``path``)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {
        "model": model_sd,
        "optim": optim_sd,
        "train": train_state,
        f"rng_rank{env.rank}": _rng_state(env),
    }
    with _one_process_quiet():
        dcp.save(state, checkpoint_id=str(path))


def _drop_unsaved_phases(path: Path, optim_sd: dict[str, Any], saved_keys: Any) -> None:
    """Older soap_dist versions did not save SOAP's staggered phases (``refresh_phase``), and DCP refuses
    a template key the checkpoint lacks: such a checkpoint loads with the phases recomputed, and says so."""
    dropped = 0
    for name, entry in optim_sd.get("state", {}).items():
        saved = f"optim.state.{name}.refresh_phase" in saved_keys
        if isinstance(entry, dict) and "refresh_phase" in entry and not saved:
            del entry["refresh_phase"]
            dropped += 1
    if dropped:
        warnings.warn(
            f"{path} holds no refresh_phase (saved by an older soap_dist): the staggered refresh phases "
            "are recomputed by this version, so refreshes may fall on other steps than in the saved run, "
            "even at the same world size (how phases are assigned has changed since)",
            stacklevel=3,
        )


def _one_line(error: BaseException) -> str:
    """``error`` as one line: for DCP's CheckpointException (a traceback per rank), the first
    failing rank's own exception."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _) = min(failures.items(), key=lambda item: item[0])
        return f"on rank {rank}: {_one_line(inner)}"
    text = str(error).strip().splitlines()
    line = type(error).__name__ + (f": {text[0]}" if text else "")
    return line if len(line) <= 200 else line[:197] + "..."


DAMAGE = (FileNotFoundError, EOFError, pickle.UnpicklingError)  # a file missing or cut short


def _damaged(error: BaseException) -> bool:
    """Whether ``error`` (or, for DCP's CheckpointException, a rank's own exception, or any cause in
    its chain) says a file of the checkpoint is missing or cut short, rather than that an intact
    checkpoint does not fit (another model or world size), or that memory or the disk failed."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DAMAGE) or "PytorchStreamReader" in str(e):
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [inner for inner, _ in failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


def unreadable(path: Path, error: BaseException | str, deepspeed: bool = False) -> ConfigError:
    """The error a checkpoint that cannot be read becomes: names it and the cause in one line; where
    a file is missing or cut short, the fix (delete it, to resume from the previous complete
    checkpoint when there is one); otherwise (an intact checkpoint that does not fit, memory, I/O),
    nothing is said to be deleted. ``deepspeed``: a DeepSpeed checkpoint (``complete_steps``)."""
    if isinstance(error, str):  # another rank's failure: that rank's message says which kind
        return ConfigError(f"--resume: could not load the checkpoint {path} ({error})")
    cause = _one_line(error)
    if not _damaged(error):
        changed = "the model or the world size" if deepspeed else "the model, parallel.* or optim.block_size"
        return ConfigError(
            f"--resume: could not load the checkpoint {path} ({cause}). Its files look whole, so keep it: "
            f"if {changed} changed since it was saved, resume with the saved values (docs/pretrain.md, "
            "'Checkpoints and resume')"
        )
    run_dir = path.parent.parent
    earlier = [s for s in complete_steps(run_dir, deepspeed) if s < _step_of(path)]
    then = (
        f"--resume then continues from {step_dir(run_dir, earlier[-1])}"
        if earlier
        else "there is no earlier complete checkpoint, so --resume then starts the run again at step 0"
    )
    return ConfigError(
        f"--resume: the checkpoint {path} is unreadable ({cause}); it was probably cut short or damaged: "
        f"delete that directory and resume again ({then})"
    )


def _step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else 0


def reading(path: Path, env: DistEnv, read: Any, deepspeed: bool = False) -> Any:
    """``read()``, with a failure turned into ``unreadable`` on every rank: the ranks agree through
    one all-reduce, so one that failed alone does not leave the others waiting in a collective (as
    long as ``read`` itself has none that a failure can skip)."""
    failure: BaseException | None = None
    result = None
    try:
        result = read()
    except (Exception, CheckpointException) as error:
        from soap_apps.pretrain.resume_check import interrupt_in  # that module imports this one

        if interrupt_in(error) is not None:
            raise
        failure = error
    flag = torch.tensor(float(failure is not None), device=env.device)
    if all_reduce_mean(flag, env).item() > 0:
        elsewhere = "another rank could not read it; see that rank's message"
        raise unreadable(path, failure or elsewhere, deepspeed)
    return result


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_template: dict[str, Any],
    env: DistEnv,
) -> dict[str, Any]:
    """Load ``path`` into ``model`` and ``optimizer`` (a collective); returns the saved ``train`` state.

    ``train_template`` has the keys (and value types) of the saved train state. RNG states are
    restored when the checkpoint has this rank's (it does when the world size is unchanged). A
    checkpoint that cannot be read (a damaged or deleted file) is a ConfigError on every rank,
    naming it and the fix (``unreadable``), rather than one traceback per rank.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "train": train_template}
    rng_key = f"rng_rank{env.rank}"
    metadata = reading(path, env, lambda: dcp.FileSystemReader(str(path)).read_metadata())
    saved_keys = metadata.state_dict_metadata
    has_rng = any(k == rng_key or k.startswith(rng_key + ".") for k in saved_keys)
    if has_rng:
        state[rng_key] = _rng_state(env)
    else:
        warnings.warn(
            f"{path} has no RNG state for rank {env.rank} (saved at another world size); "
            "this rank keeps its seeded RNG",
            stacklevel=2,
        )
    _drop_unsaved_phases(path, optim_sd, saved_keys)
    with _one_process_quiet():
        reading(path, env, lambda: dcp.load(state, checkpoint_id=str(path)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if has_rng:
        torch.set_rng_state(state[rng_key]["cpu"])
        if "cuda" in state[rng_key]:
            torch.cuda.set_rng_state(state[rng_key]["cuda"], env.device)
    return state["train"]


def check_run_dir(run_dir: Path, resume: bool, backend: str) -> None:
    """Refuse to start a fresh run in a non-empty directory, whatever the backend (the new run would
    replace the old one's metrics.jsonl, loss.png and final/, and mix its checkpoints with the old
    ones), and to resume from checkpoints only another backend can load (they would be overwritten)."""
    if not run_dir.is_dir():
        return
    if not resume:
        held = run_entries(run_dir)
        if held:
            raise ConfigError(
                f"{run_dir} already holds a run ({shown_entries(held)}); pass --resume to continue that run, "
                "or --out another directory to start a new one"
            )
        return
    own = "DeepSpeed" if backend.startswith("deepspeed") else "DCP"
    present = formats_present(run_dir)
    if present and own not in present:
        raise ConfigError(
            f"--resume: {run_dir / CHECKPOINTS} holds {' and '.join(present)} checkpoints, "
            f"which this backend ({backend}) cannot load; resume with the backend that wrote them, "
            "or pass --out another directory to start a new run"
        )
