"""What the pre-training tests (tests/test_pretrain_*.py) share: the launcher's and the tiny
config's paths, and a temporary token cache, so that no test writes to the home directory's."""

from __future__ import annotations

import os
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
