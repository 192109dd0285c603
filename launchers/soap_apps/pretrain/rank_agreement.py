"""Every rank must run the same command: checked once at the start, and on which checkpoint to resume.

Under torchrun on several nodes each node is started by its own command line. A node given another
--seed, micro-batch or corpus trained silently apart (another seed under HSDP: a replica with other
weights for the whole run); one given other step counts or checkpoint intervals hung in collectives
that no longer matched; and with a run directory that is not shared, the ranks resumed from
different checkpoints and gloo aborted. One all_gather of a small summary per rank catches all of
these with one error naming what differs on which ranks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch.distributed as dist

from soap_apps.config_loader import ConfigError
from soap_apps.pretrain.config import Config
from soap_apps.pretrain.parallel import DistEnv

# what a check of the input raises (its message says it all; ``agreed`` passes on any error)
INPUT_ERRORS = (ConfigError, FileExistsError, FileNotFoundError)
T = TypeVar("T")
DATA_SAMPLES = 4096  # tokens read, evenly spaced, for the corpus's fingerprint
# Keys that may differ between nodes: where each node keeps its copy of the corpus and its cache (the
# tokens themselves are compared by fingerprint), and the CPU threads of its machine.
LOCAL_KEYS = ("data.path", "data.cache_dir", "train.threads")


def tokens_fingerprint(tokens: np.ndarray) -> str:
    """Length and a hash of evenly spaced tokens: the same corpus gives the same on every node."""
    n = len(tokens)
    step = max(1, n // DATA_SAMPLES)
    sample = np.ascontiguousarray(tokens[::step][:DATA_SAMPLES])
    return f"{n} tokens, {hashlib.blake2b(sample.tobytes(), digest_size=8).hexdigest()}"


def config_digest(config: dict[str, Any]) -> str:
    """A hash of a JSON config's contents (DeepSpeed's): its path may be each node's own."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _flat(cfg: Config) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, values in cfg.to_dict().items()
        for key, value in values.items()
        if f"{section}.{key}" not in LOCAL_KEYS
    }


def gather(mine: Any) -> list[Any]:
    """Every rank's ``mine``, by rank, over the default process group (``[mine]`` without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def differences(every: list[dict[str, Any]]) -> list[str]:
    """'key: value on ranks [..], value on ranks [..]' for each key whose value differs."""
    lines = []
    for key in every[0]:
        by_value: dict[str, list[int]] = {}
        for rank, mine in enumerate(every):
            by_value.setdefault(repr(mine.get(key)), []).append(rank)
        if len(by_value) > 1:
            shown = ", ".join(f"{value} on ranks {ranks}" for value, ranks in by_value.items())
            lines.append(f"{key}: {shown}")
    return lines


def check_same_command(env: DistEnv, cfg: Config, corpus: str, flags: dict[str, Any]) -> None:
    """ConfigError on every rank when the ranks resolved other configs, read other corpora (``corpus``:
    this rank's ``tokens_fingerprint``) or were given other launcher flags (``flags``: --out, ...)."""
    if not env.distributed:
        return
    mine = {**_flat(cfg), "corpus": corpus, **flags}
    refuse_differences(
        gather(mine),
        "ranks",
        "every node must run the same command, with the same config file, --set values, flags and corpus",
    )


def refuse_differences(every: list[dict[str, Any]], who: str, advice: str) -> None:
    """ConfigError naming each key whose value differs between ``every``'s entries (by rank), and what
    to do (``advice``); ``who``: "ranks" or "processes", as the launcher calls them."""
    differ = differences(every)
    if differ:
        raise ConfigError(
            f"the {who} were started with different settings ("
            + "; ".join(differ[:6])
            + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
            + f"): {advice}"
        )


def check_same_checkpoint(env: DistEnv, latest: int | None, run_dir: str) -> None:
    """ConfigError on every rank when the ranks see different newest checkpoints in the run directory:
    it is not one directory that every rank sees (node-local disks), and a resume would mix steps."""
    if not env.distributed:
        return
    every = gather(latest)
    if len(set(every)) > 1:
        seen = ", ".join(f"rank {r}: {'none' if s is None else f'step {s}'}" for r, s in enumerate(every))
        raise ConfigError(
            f"--resume: the ranks see different newest checkpoints under {run_dir} ({seen}): --out must be "
            "one directory every rank sees, on a file system shared by the nodes (each rank writes "
            "its own shard of every checkpoint there)"
        )


def raise_any(error: BaseException | None, every: list[str | None]) -> None:
    """This process's own input error, or one naming the first process that refused its input: the
    others would wait for it in their next collective (with NCCL, until its timeout)."""
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(every) if message is not None]
    if failed:
        rank, message = failed[0]
        more = f" (and {len(failed) - 1} other processes)" if len(failed) > 1 else ""
        raise ConfigError(f"process {rank} refused its input{more}: {message}")


def described(error: BaseException) -> str:
    """An error as the other ranks are told of it: an input error's message, else with its type."""
    return str(error) if isinstance(error, INPUT_ERRORS) else f"{type(error).__name__}: {error}"


def agreed(check: Callable[[], T]) -> T:
    """``check()`` on every process; an error it raises on one (an input refused, or anything else
    short of an interrupt) is raised on every one: the refusing process's own, a ConfigError naming
    it on the others."""
    try:
        result, error = check(), None
    except Exception as caught:  # (an interrupt reaches every process alike; it is not held here)
        result, error = None, caught
    raise_any(error, gather(None if error is None else described(error)))
    return result  # type: ignore[return-value]
