"""One run at a time in a run directory: rank 0 holds an exclusive lock on it while the run lasts.

Two jobs given the same --out (or --output-dir) both passed the "directory not empty" check when
they started together, then interleaved their metrics and overwrote each other's checkpoints; a
second job told to --resume a run that was still going did the same, and fine-tuning's restart of
an interrupted run deleted a live run's metrics. The lock is an ``flock`` on a file in the
directory: the kernel drops it when its holder exits, however it exits (SIGKILL included), so a
dead run never keeps it, and the holder's pid and host in the file name the live one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from soap_apps.config_loader import ConfigError

LOCK_FILE = ".run.lock"  # not part of a run: the checks of what a directory holds pass it over


def run_entries(run_dir: Path) -> list[Path]:
    """What ``run_dir`` holds of a run, sorted by name (the lock file is not part of one)."""
    return sorted(p for p in run_dir.iterdir() if p.name != LOCK_FILE)


def shown_entries(entries: list[Path], limit: int = 6) -> str:
    """``entries`` as an error message lists them: "a/, b, ..." (directories end in a slash)."""
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:limit]]
    return ", ".join(names) + (", ..." if len(entries) > limit else "")


class RunDirInUse(ConfigError):
    """Another live process holds the run directory."""


def _claim(run_dir: Path) -> tuple[IO[str] | None, str | None]:
    """(the held lock file, None) or (None, why not)."""
    for _ in range(5):
        handle, problem = _lock_once(run_dir)
        if handle is None or _still_there(run_dir, handle):
            return handle, problem
        handle.close()  # its holder removed the file between our open and our lock: lock the new one
    return None, f"{run_dir}: its lock file kept changing; is another run starting there now?"


def _still_there(run_dir: Path, handle: IO[str]) -> bool:
    """Whether the locked file is the one at the path (not one a finished run has just removed)."""
    try:
        return os.stat(run_dir / LOCK_FILE).st_ino == os.fstat(handle.fileno()).st_ino
    except OSError:
        return False


def _lock_once(run_dir: Path) -> tuple[IO[str] | None, str | None]:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole run
    except OSError as error:
        return None, f"{run_dir}: cannot write its lock file ({error.strerror or error})"
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return None, (
            f"{run_dir} is in use by a run that is still going ({holder}): wait for it to end, or give "
            "another directory; two runs in one directory mix their metrics and overwrite each other's "
            "checkpoints"
        )
    except OSError as error:  # a file system without locks (some NFS mounts): the run goes on unguarded
        handle.close()
        why = error.strerror or error
        print(f"warning: {run_dir}: cannot lock it ({why}); make sure no other run uses it", file=sys.stderr)
        return None, None
    with contextlib.suppress(OSError):  # who holds it: a courtesy to the next job's message
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(handle.fileno(), 0)
        os.write(handle.fileno(), f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode())
    return handle, None


@contextlib.contextmanager
def holding(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Hold ``run_dir`` for the block: rank 0 (``is_main``) takes the lock, ``from_rank0`` hands its
    verdict to every rank, and every rank raises RunDirInUse alike when another run holds it. The
    lock file is removed at the end (a killed run's is passed over, not held)."""
    handle, problem = _claim(run_dir) if is_main else (None, None)
    problem = from_rank0(problem)
    if problem is not None:
        raise RunDirInUse(problem)
    try:
        yield
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(run_dir / LOCK_FILE)  # a job that opened it meanwhile sees the inode go (_claim)
            with contextlib.suppress(OSError):
                handle.close()


def from_rank0(value: str | None) -> str | None:
    """Rank 0's verdict on every rank of the default process group (itself without one). torch picks
    the object collective's device from the group's backend and the current CUDA device."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
