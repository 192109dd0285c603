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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from soap_apps.pretrain.parallel import DistEnv

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step_(\d+)$")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step_{step}"


def checkpoint_steps(run_dir: Path, marker: str = ".metadata") -> list[int]:
    """Steps of the complete checkpoints under ``run_dir`` (those whose ``marker`` file exists), ascending."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / marker).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def deepspeed_latest(run_dir: Path) -> str | None:
    """The tag in DeepSpeed's ``latest`` file under ``run_dir`` (DeepSpeed writes it once a save has
    completed); None when there is no such file."""
    latest = run_dir / CHECKPOINTS / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def formats_present(run_dir: Path) -> list[str]:
    """The checkpoint formats found under ``run_dir``: "DCP" (a complete step_N/.metadata) and/or
    "DeepSpeed" (its ``latest`` file); lets a backend tell another backend's checkpoints from none."""
    found = ["DCP"] if checkpoint_steps(run_dir) else []
    return found + (["DeepSpeed"] if deepspeed_latest(run_dir) is not None else [])


def prune(run_dir: Path, keep: int | None, env: DistEnv) -> None:
    """Delete all but the newest ``keep`` step directories (rank 0; after every rank finished saving)."""
    if keep is None or not env.is_main:
        return
    root = run_dir / CHECKPOINTS
    steps = sorted(int(m.group(1)) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)))
    for step in steps[:-keep]:
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
            "are recomputed for this world size, so refreshes may fall on other steps than in the saved run",
            stacklevel=3,
        )


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_template: dict[str, Any],
    env: DistEnv,
) -> dict[str, Any]:
    """Load ``path`` into ``model`` and ``optimizer`` (a collective); returns the saved ``train`` state.

    ``train_template`` has the keys (and value types) of the saved train state. RNG states are
    restored when the checkpoint has this rank's (it does when the world size is unchanged).
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "train": train_template}
    rng_key = f"rng_rank{env.rank}"
    saved_keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
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
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if has_rng:
        torch.set_rng_state(state[rng_key]["cpu"])
        if "cuda" in state[rng_key]:
            torch.cuda.set_rng_state(state[rng_key]["cuda"], env.device)
    return state["train"]
