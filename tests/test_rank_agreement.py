"""The pre-training launcher's check that every rank runs the same command (soap_apps.pretrain
.rank_agreement), on 2 gloo ranks: a node started with another seed, micro-batch or corpus trained
apart silently; one with a run directory of its own resumed from another checkpoint."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAUNCHERS = str(Path(__file__).resolve().parents[1] / "launchers")


def _worker(rank: int, init: str, out: str, case: str) -> None:
    sys.path.insert(0, LAUNCHERS)
    from soap_apps.pretrain.config import Config
    from soap_apps.pretrain.parallel import DistEnv
    from soap_apps.pretrain.rank_agreement import (
        check_same_checkpoint,
        check_same_command,
        tokens_fingerprint,
    )

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    env = DistEnv(rank=rank, world=2, local_rank=rank, local_world=2, device=torch.device("cpu"))
    cfg = Config()
    tokens = np.arange(10_000, dtype=np.uint16)
    flags = {"--out": "runs/x", "--resume": False}
    if rank == 1 and case == "seed":
        cfg.train.seed += 1
    if rank == 1 and case == "corpus":
        tokens = tokens[::-1].copy()
    if rank == 1 and case == "local":  # another copy of the corpus, at another path: allowed
        cfg.data.path = "/local/copy"
    errors = []
    for check in (
        lambda: check_same_command(env, cfg, tokens_fingerprint(tokens), flags),
        lambda: check_same_checkpoint(env, 3 if rank == 0 or case != "checkpoint" else None, "runs/x"),
    ):
        try:
            check()
            errors.append("")
        except Exception as error:
            errors.append(
                f"{type(error).__name__}: {error}"
                if "ConfigError" in type(error).__name__
                else traceback.format_exc()
            )
    torch.save(errors, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def _run(case: str) -> list[list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, case), nprocs=2)
        return [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]


@pytest.mark.parametrize(
    "case, command, checkpoint",
    [
        ("same", "", ""),
        ("local", "", ""),
        ("seed", "train.seed: 0 on ranks [0], 1 on ranks [1]", ""),
        ("corpus", "corpus: '10000 tokens, ", ""),
        (
            "checkpoint",
            "",
            "(rank 0: step 3, rank 1: none): --out must be one directory every rank sees",
        ),
    ],
)
def test_ranks_started_otherwise_stop_naming_the_difference(case, command, checkpoint):
    for errors in _run(case):
        assert (command in errors[0]) and bool(errors[0]) == bool(command), errors
        assert (checkpoint in errors[1]) and bool(errors[1]) == bool(checkpoint), errors
        if command:
            assert errors[0].startswith("ConfigError: the ranks were started with different settings")


FINETUNE_CASES = {  # what rank 1 does otherwise -> what the error names ("" for no error)
    "same": "",
    "local": "",  # its own copies of the corpus and the run directory, at other paths: allowed
    "lr": "lr: 0.003 on ranks [0], 0.001 on ranks [1]",
    "corpus": "corpus: '20000 bytes, ",
    "checkpoint": "resuming from: 'step_4' on ranks [0], None on ranks [1]",
    "refused": "process 1 refused its input: --resume latest: no checkpoints/step_N",  # on rank 0
}


def _finetune_worker(rank: int, init: str, out: str) -> None:
    sys.path.insert(0, LAUNCHERS)
    from soap_apps.config_loader import ConfigError
    from soap_apps.finetune.agreement import check_same_run
    from soap_apps.finetune.config import FinetuneConfig
    from soap_apps.pretrain.rank_agreement import agreed

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    errors = {}
    for case in FINETUNE_CASES:
        cfg, data, start = FinetuneConfig(), torch.arange(20_000) % 256, Path("runs/x/checkpoints/step_4")
        if rank == 1:
            if case == "local":
                cfg.data, cfg.output_dir, start = "/local/copy", "/local/runs/x", Path("/local/x/step_4")
            if case == "lr":
                cfg.lr = 1e-3
            if case == "corpus":
                data = data.flip(0)
            if case == "checkpoint":
                start = None
        refused = None
        if rank == 1 and case == "refused":  # its own disk holds no checkpoint: it stops, and rank 0 too
            refused = FileNotFoundError("--resume latest: no checkpoints/step_N here")
            data, start = None, None
        try:
            check_same_run(cfg, data, start, refused)
            errors[case] = ""
        except Exception as error:
            errors[case] = f"{type(error).__name__}: {error}"

    def inputs() -> int:  # the checks before the run directory's lock
        if rank == 1:
            raise ConfigError("--data 'x' does not exist")
        return 1

    try:
        agreed(inputs)
        errors["agreed"] = ""
    except Exception as error:
        errors["agreed"] = f"{type(error).__name__}: {error}"
    torch.save(errors, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_finetune_processes_started_otherwise_stop_naming_the_difference():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_finetune_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    for rank, errors in enumerate(ranks):
        for case, named in FINETUNE_CASES.items():
            error = errors[case]
            if case == "refused":
                own = "FileNotFoundError: --resume latest: no checkpoints/step_N here"
                assert error == (f"ConfigError: {named} here" if rank == 0 else own), (rank, error)
                continue
            assert (named in error) and bool(error) == bool(named), (case, error)
            if named:
                assert error.startswith("ConfigError: the processes were started with different settings")
                assert "--output-dir must be one directory every process sees" in error
        refused = "--data 'x' does not exist"
        others = f"process 1 refused its input: {refused}"
        assert errors["agreed"] == f"ConfigError: {others if rank == 0 else refused}", errors["agreed"]
