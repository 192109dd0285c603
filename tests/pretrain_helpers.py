"""What the pre-training tests (tests/test_pretrain_*.py) share: the launcher's and the tiny
config's paths, a temporary token cache, so that no test writes to the home directory's, and the
launcher started as the ranks of one job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from soap_apps.pretrain import data

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "launchers" / "pretrain.py"
TINY = REPO / "configs" / "pretrain" / "tiny-cpu.yaml"
# --set overrides for a model small enough that a step takes milliseconds, at world 1 or 2
SMALL_MODEL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.seq_len=32",
    "optim.block_size=16",
    "train.micro_batch=4",
    "train.eval_batches=2",
    "train.threads=1",
]


def temporary_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh token cache directory as SOAP_DIST_CACHE until the generator resumes (a fixture's
    teardown), then the variable as it was."""
    path = tmp_path_factory.mktemp("soap_dist_cache")
    old = os.environ.get(data.CACHE_ENV)
    os.environ[data.CACHE_ENV] = str(path)
    yield path
    if old is None:
        os.environ.pop(data.CACHE_ENV, None)
    else:
        os.environ[data.CACHE_ENV] = old


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_ranks(args: list[str], world: int, timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """The launcher as the ``world`` ranks of one job, each a process with the environment torchrun
    gives its workers (none of it for world 1: one process without a launcher), so that each rank's
    own exit code and output can be checked (torchrun reports the first failure and stops the other
    ranks). A rank still running ``timeout`` seconds after the start (a hang) fails the test, with
    every rank killed."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    if world > 1:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
        env["LOCAL_WORLD_SIZE"] = str(world)
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(LAUNCHER), *args],
            stdout=out,
            stderr=err,
            text=True,
            cwd=REPO,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)} if world > 1 else env,
        )
        for rank, (out, err) in enumerate(files)
    ]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    done = []
    for proc, (out, err) in zip(procs, files, strict=True):
        with out, err:
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
    return done
