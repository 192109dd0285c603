"""The pre-training launcher (launchers/pretrain.py, soap_apps.pretrain.trainer): the DeepSpeed
JSON's optimizer params, run directories, and the launcher end to end at world 2 (FSDP2 with a
resume, and DeepSpeed ZeRO-2) and in one process. Process start-up dominates the cost: the world-2
checks are few and tiny. Every test uses a temporary cache directory (SOAP_DIST_CACHE), never the
home directory.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from pretrain_helpers import LAUNCHER, REPO, SMALL_MODEL, TINY, temporary_cache

from soap_apps.pretrain import data, parallel
from soap_apps.pretrain.config import ConfigError, load_config
from soap_apps.pretrain.metrics import read_records
from soap_apps.pretrain.model import load_exported
from soap_apps.pretrain.trainer import run

SMALL = [*SMALL_MODEL, "train.log_every=1"]  # a world-2 step takes milliseconds

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One token cache for the module (the standard library corpus is prepared once, ~0.5 s)."""
    yield from temporary_cache(tmp_path_factory)


# ----- the DeepSpeed JSON's optimizer params -----
def _ds_json(tmp_path: Path, params: dict, kind: str = "SOAP") -> Path:
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    ds["optimizer"] = {"type": kind, "params": params}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


def test_deepspeed_params_carry_every_soap_key_of_the_config(tmp_path):
    """optim.refresh_schedule, basis_dtype and async_refresh reach SOAP under --deepspeed too (they
    were left out of the JSON's params, silently)."""
    from soap_apps.pretrain.ds_backend import resolve_config
    from soap_dist.deepspeed import soap_from_config

    env = parallel.DistEnv(rank=0, world=2, local_rank=0, local_world=2, device=torch.device("cpu"))
    overrides = ["optim.refresh_schedule=staggered", "optim.basis_dtype=bfloat16"]
    overrides.append("optim.async_refresh=false")
    ds, _, _ = resolve_config(_ds_json(tmp_path, {}), load_config(TINY, overrides), env)
    got = ds["optimizer"]["params"]
    want = ("staggered", "bfloat16", False)
    assert (got["refresh_schedule"], got["basis_dtype"], got["async_refresh"]) == want
    soap, _ = soap_from_config(json.loads(json.dumps(ds)), [torch.nn.Parameter(torch.zeros(3, 3))])
    assert (soap.refresh_schedule, soap.basis_dtype, soap.async_refresh) == (want[0], torch.bfloat16, False)


def test_deepspeed_json_optimizer_params_win_over_the_config_and_are_checked(tmp_path):
    """Issue 13: the JSON's optimizer.params used to be replaced by the YAML's without a word."""
    from soap_apps.pretrain.ds_backend import resolve_config

    env = parallel.DistEnv(rank=0, world=2, local_rank=0, local_world=2, device=torch.device("cpu"))
    cfg = load_config(TINY, ["optim.lr=1e-3", "optim.refresh_delay=1"])
    params = {"lr": 0.002, "betas": "auto", "max_precond_dim": 64, "precondition_frequency": 5}
    ds, merged, notes = resolve_config(_ds_json(tmp_path, params), cfg, env)
    got = ds["optimizer"]["params"]
    assert got["lr"] == 0.002 and got["precondition_frequency"] == 5 and got["max_precond_dim"] == 64
    assert got["betas"] == [0.95, 0.95] and got["refresh_delay"] == 1 and got["block_size"] == 64
    # the merged config drives the schedule, the weight-decay groups and config.yaml
    assert merged.optim.lr == 0.002 and merged.optim.precondition_frequency == 5 and cfg.optim.lr == 1e-3
    assert "optim.lr: 0.001 -> 0.002 (the JSON's optimizer.params)" in notes
    assert (
        "SOAP params from the JSON: lr, max_precond_dim, precondition_frequency; from the config (optim.*): "
        "betas, eps, weight_decay, shampoo_beta, merge_dims, precondition_1d, normalize_grads, block_size, "
        "refresh_delay, fused, refresh_schedule, basis_dtype, async_refresh, owner_scope"
    ) in notes
    assert merged.optim.max_precond_dim == 64  # an optim.* key too since the two apps share SOAP_KEYS
    with pytest.raises(ConfigError, match=r"unknown SOAP key 'precondition_freq' in optimizer.params; .*lr,"):
        resolve_config(_ds_json(tmp_path, {"precondition_freq": 5}), cfg, env)
    with pytest.raises(ConfigError, match=r"optim.lr must be a number, got 'fast'"):
        resolve_config(_ds_json(tmp_path, {"lr": "fast"}), cfg, env)
    adamw = load_config(TINY, ["optim.name=adamw"])
    with pytest.raises(ConfigError, match=r"unknown AdamW key 'max_precond_dim'.*: lr, betas, eps, weight"):
        resolve_config(_ds_json(tmp_path, {"max_precond_dim": 64}, "AdamW"), adamw, env)
    ds, merged, notes = resolve_config(_ds_json(tmp_path, params), adamw, env)  # the shipped JSONs are SOAP's
    want = {"lr": 3e-3, "eps": 1e-8, "weight_decay": 0.01, "torch_adam": True, "betas": [0.95, 0.95]}
    assert ds["optimizer"] == {"type": "AdamW", "params": want}  # torch's AdamW: nothing compiled
    assert notes[0].startswith("optimizer.params (lr, betas, max_precond_dim, precondition_frequency) not")


# ----- run directories -----
def _no_torchrun(monkeypatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def test_every_backend_refuses_another_runs_directory(tmp_path, monkeypatch):
    """A fresh run into a non-empty directory is refused whatever the backend, and --resume refuses
    checkpoints only the other backend can load; both before anything is written (issue 13)."""
    _no_torchrun(monkeypatch)
    cfg = load_config(TINY, [*SMALL, "train.steps=2"])
    zero2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
    ds_run = tmp_path / "ds"  # what a --deepspeed run leaves
    (ds_run / "checkpoints" / "step_2").mkdir(parents=True)
    (ds_run / "checkpoints" / "latest").write_text("step_2")
    (ds_run / "metrics.jsonl").write_text('{"step": 2, "eval_loss": 3.0}\n')
    dcp_run = tmp_path / "dcp"  # what a torchrun run leaves
    (dcp_run / "checkpoints" / "step_2").mkdir(parents=True)
    (dcp_run / "checkpoints" / "step_2" / ".metadata").write_bytes(b"")
    (dcp_run / "loss.png").write_bytes(b"")
    for run_dir, deepspeed in ((ds_run, None), (dcp_run, zero2), (ds_run, zero2), (dcp_run, None)):
        held = rf"{re.escape(str(run_dir))} already holds a run \(checkpoints/, .*\); pass --resume"
        with pytest.raises(ConfigError, match=held):
            run(cfg, run_dir=run_dir, deepspeed_config=deepspeed)
    with pytest.raises(ConfigError, match=r"holds DeepSpeed checkpoints, which this backend \(single\)"):
        run(cfg, run_dir=ds_run, resume=True)
    with pytest.raises(ConfigError, match=r"holds DCP checkpoints, which this backend \(deepspeed-zero2\)"):
        run(cfg, run_dir=dcp_run, resume=True, deepspeed_config=zero2)
    assert sorted(p.name for p in ds_run.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in dcp_run.iterdir()) == ["checkpoints", "loss.png"]


def test_default_run_directory_names_the_backend(monkeypatch):
    sys.path.insert(0, str(LAUNCHER.parent))
    try:
        import pretrain as launcher
    finally:
        sys.path.pop(0)
    seen = []
    monkeypatch.setattr(launcher, "run", lambda cfg, run_dir, **kw: seen.append(str(run_dir)))
    _no_torchrun(monkeypatch)
    zero3 = ["--deepspeed", "configs/deepspeed/zero3.json"]
    for argv in ([], ["--parallel", "ddp"], zero3):
        assert launcher.main(argv) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in ([], ["--parallel", "ddp"], ["--parallel", "hsdp"], zero3):
        assert launcher.main(argv) == 0
    assert launcher.main(["--out", "elsewhere"]) == 0
    backends = ["single", "single", "deepspeed-zero3", "fsdp2", "ddp", "hsdp", "deepspeed-zero3"]
    assert seen == [*(f"runs/pretrain-tiny-cpu-{b}" for b in backends), "elsewhere"]


# ----- the launcher end to end -----
def _torchrun(
    args: list[str], cache: Path, timeout: float = 180, expect_rc: int = 0
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(LAUNCHER),
        "--config",
        str(TINY),
        *args,
    ]
    env = {**os.environ, data.CACHE_ENV: str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == expect_rc, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _png_text(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as image:
        return dict(image.text)


def _sets(*overrides: str) -> list[str]:
    return [arg for o in (*SMALL, *overrides) for arg in ("--set", o)]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r]


def test_launcher_fsdp2_world2_and_resume_reproduces_the_run(tmp_path, cache):
    common = _sets(
        "train.steps=8",
        "train.grad_accum=2",
        "train.checkpoint_every=4",
        "train.eval_every=4",
        "train.keep_checkpoints=null",
    )
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = _torchrun([*common, "--out", str(whole)], cache)
    assert "soap, fsdp2, world 2 on cpu" in proc.stdout and "done at step 8" in proc.stdout
    assert "warn" not in proc.stderr.lower() + proc.stdout.lower(), proc.stderr[-3000:]  # issue 13
    assert "(nats/byte)" in proc.stdout and "loss in nats/byte" in proc.stderr  # the summary, the bar
    assert _png_text(whole / "loss.png")["Title"] == "tiny-cpu: soap, fsdp2, world 2"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "checkpoints/step_4/.metadata",
        "checkpoints/step_8/.metadata",
        "final/model.pt",
        "final/config.json",
    ):
        assert (whole / name).exists(), name
    assert load_config(whole / "config.yaml").model.d_model == 32
    records = read_records(whole / "metrics.jsonl")
    losses = _losses(whole)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert [(r["step"], r["eval_windows"]) for r in records if "eval_loss" in r] == [(4, 32), (8, 32)]
    model = load_exported(whole / "final")
    assert model.cfg.d_model == 32 and model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 256)

    # a new run directory holding only the step-4 checkpoint: --resume must retrace steps 5..8 exactly
    shutil.copytree(whole / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4")
    proc = _torchrun([*common, "--out", str(resumed), "--resume"], cache)
    assert "resuming at step 4" in proc.stdout
    assert [r["step"] for r in read_records(resumed / "metrics.jsonl") if "loss" in r] == [5, 6, 7, 8]
    assert np.allclose(_losses(resumed), losses[4:], rtol=1e-6, atol=0), (_losses(resumed), losses)
    assert (resumed / "final" / "model.pt").exists()


def test_one_process_stop_resume_and_refusal(tmp_path, cache, monkeypatch):
    """In this process (no torchrun): --stop-after then --resume equals the uninterrupted run; a second
    fresh run into the same directory is refused; resuming a finished run only evaluates and exports."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello soap " * 400)
    cfg = load_config(TINY, [*SMALL, "train.steps=4", f"data.path={texts}", "data.eval_fraction=0.1"])
    with warnings.catch_warnings(record=True) as caught:  # issue 13: DCP's "single process" warning,
        warnings.simplefilter("always")  # printed with a stray `return func(*args, **kwargs)` line
        whole = run(cfg, run_dir=tmp_path / "whole")
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    assert whole.step == 4 and math.isfinite(whole.eval_loss) and whole.exported is not None
    # loss.png names the run (the config's name defaults to the directory's) and the loss's unit
    assert _png_text(tmp_path / "whole" / "loss.png") == {
        "Title": "whole: soap, single, world 1",
        "Description": "loss in nats/byte against step",
        "Software": ANY,
    }
    stopped = run(cfg, run_dir=tmp_path / "split", stop_after=2)
    assert stopped.step == 2 and stopped.exported is None
    with warnings.catch_warnings(record=True) as caught:  # a load too
        warnings.simplefilter("always")
        finished = run(cfg, run_dir=tmp_path / "split", resume=True)
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
    elapsed = [r["elapsed_s"] for r in read_records(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert elapsed == sorted(elapsed), elapsed  # the resumed part continues the clock
    assert finished.eval_loss == whole.eval_loss
    held = r"whole already holds a run \(checkpoints/, config.yaml, corpus.txt, final/"
    with pytest.raises(ConfigError, match=held):
        run(cfg, run_dir=tmp_path / "whole")
    again = run(cfg, run_dir=tmp_path / "whole", resume=True)  # nothing left to train
    assert again.step == 4 and again.eval_loss == whole.eval_loss and len(_losses(tmp_path / "whole")) == 4
    adamw = run(
        load_config(
            TINY,
            [*SMALL, "train.steps=2", f"data.path={texts}", "data.eval_fraction=0.1", "optim.name=adamw"],
        ),
        run_dir=tmp_path / "adamw",
    )
    assert adamw.step == 2 and math.isfinite(adamw.train_loss)


def test_deepspeeds_deprecated_collective_warnings_are_dropped_and_others_kept():
    """DeepSpeed's comm layer calls torch's deprecated all_gather_into_tensor (every ZeRO step) and
    reduce_scatter_tensor (ZeRO-3: every micro-batch, 16 stray lines in an 8-step run of 2 ranks)."""
    import warnings

    from soap_apps.quiet import no_deprecated_all_gather_warning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        no_deprecated_all_gather_warning()
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce_coalesced"):
            warnings.warn(f"`torch.distributed.{name}` is deprecated. Use ...", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "`torch.distributed.all_reduce_coalesced` is deprecated. Use ..."
    ]


def test_launcher_deepspeed_zero2_world2(tmp_path, cache):
    out = tmp_path / "ds"
    # the JSON's optimizer params win over the config's (warmup is 20 steps: lr = 0.002 * step / 20)
    ds_json = _ds_json(tmp_path, {"lr": 0.002, "betas": [0.95, 0.95], "max_precond_dim": 64})
    args = [*_sets("train.steps=4", "train.grad_accum=2"), "--deepspeed", str(ds_json)]
    proc = _torchrun([*args, "--out", str(out)], cache)
    assert "deepspeed" in proc.stdout and "done at step 4" in proc.stdout
    # issue 13: no "untested optimizer" banner, no accelerator probe, no all_gather_into_tensor FutureWarning
    assert "warn" not in proc.stderr.lower() + proc.stdout.lower(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "optim.lr: 0.003 -> 0.002 (the JSON's optimizer.params)" in proc.stdout
    assert [r["lr"] for r in read_records(out / "metrics.jsonl") if "lr" in r] == pytest.approx(
        [0.002 * s / 20 for s in (1, 2, 3, 4)]
    )
    resolved = json.loads((out / "ds_config.json").read_text())
    assert resolved["train_micro_batch_size_per_gpu"] == 4 and resolved["gradient_accumulation_steps"] == 2
    assert resolved["train_batch_size"] == 16 and resolved["optimizer"]["type"] == "SOAP"
    assert resolved["optimizer"]["params"]["lr"] == 0.002 == load_config(out / "config.yaml").optim.lr
    assert resolved["optimizer"]["params"]["max_precond_dim"] == 64
    assert resolved["zero_optimization"]["stage"] == 2 and not resolved["bf16"]["enabled"]
    records = read_records(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(r["grad_norm"] > 0 for r in records if "loss" in r)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert load_exported(out / "final").cfg.d_model == 32

    # a second fresh run into the same directory is refused before it writes anything (issue 13:
    # it used to replace metrics.jsonl, loss.png and final/)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = _torchrun([*args, "--out", str(out)], cache, expect_rc=1)  # torchrun: a rank exited with 2
    assert f"{out} already holds a run (checkpoints/, config.yaml, corpus.txt, ds_config.json" in proc.stderr
    assert "pass --resume to continue that run, or --out another directory" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.eps=0", "optim.eps must be a finite number > 0"),
        ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
        ("optim.lr=-1", "optim.lr must be a finite number > 0, got -1"),
        ("optim.weight_decay=inf", "optim.weight_decay must be a finite number >= 0, got inf"),
        ("optim.grad_clip=inf", "optim.grad_clip must be a finite number > 0, or null"),
        ("optim.refresh_delay=20", "optim.refresh_delay must be < optim.precondition_frequency (10)"),
        ("optim.refresh_schedule=bogus", "optim.refresh_schedule must be 'all' or 'staggered'"),
        ("optim.owner_scope=replica", "optim.owner_scope must be 'world' or 'shard_group'"),
        ("optim.async_refresh=true", "optim.async_refresh must be null or false with optim.refresh_delay=0"),
    ],
)
def test_values_soap_would_refuse_are_config_errors_naming_the_key(override, message):
    """Caught with the config, as one line naming the optim.* key, not as SOAP's traceback later."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_finetune_betas_and_eps_are_checked_with_the_flags():
    from soap_apps.finetune.config import FinetuneConfig

    for field, value in (
        ("beta1", 1.5),
        ("beta2", -0.1),
        ("eps", 0.0),
        ("lr", math.inf),
        ("eps", math.inf),
    ) + (
        ("grad_clip", math.inf),
        ("weight_decay", math.inf),
        ("weight_decay", -1.0),
    ):
        with pytest.raises(ValueError, match=f"{field} must be"):
            FinetuneConfig(**{field: value}).validate()


def test_tokens_count_what_the_data_order_trained_when_the_batch_changes(tmp_path):
    """A resume with another global batch (allowed) counts on from the sampler's own count of windows
    trained; ``step * tokens_per_step`` made the column go backwards, and a count from the kept records'
    rate went wrong after a second change."""
    from soap_apps.pretrain.data import BatchSampler
    from soap_apps.pretrain.metrics import Metrics

    tokens = np.arange(10_000, dtype=np.uint16)
    trained = 0
    order = dict(seq_len=8, grad_accum=1, rank=0, world=2, seed=0)
    sampler = BatchSampler(tokens, micro_batch=4, **order)
    for micro_batch, steps in ((4, 10), (2, 5), (8, 3)):  # two resumes, each with another batch
        state = sampler.state_dict()
        sampler = BatchSampler(tokens, micro_batch=micro_batch, **order)
        sampler.load_state_dict(state)
        for _ in range(steps):
            sampler.next_step()
            trained += micro_batch * 2 * 8
    assert sampler.next_window * 8 == trained
    env = parallel.DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0, "tokens": 512 * s}) + "\n" for s in (10, 20, 30, 40))
    )
    metrics = Metrics(
        tmp_path, env, start_step=30, total_steps=50, tokens_per_step=128, log_every=1, tokens_at_start=15360
    )
    for step in (31, 32):
        metrics.log_train(step, torch.tensor(1.0), torch.tensor(1.0), 0.1, force=False)
    metrics.close(plot=False)
    counted = [r["tokens"] for r in read_records(tmp_path / "metrics.jsonl")]
    assert counted == [5120, 10240, 15360, 15488, 15616]


def test_deepspeed_without_a_launcher_runs_as_one_process(tmp_path, cache, monkeypatch):
    """`python launchers/pretrain.py --deepspeed ...` used to fail deep in DeepSpeed (no mpi4py);
    it now runs as a one-rank launch. Part of a launcher's environment is refused, naming the fix."""
    pytest.importorskip("deepspeed")
    zero2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    cmd = [
        sys.executable,
        str(LAUNCHER),
        *_sets("train.steps=1"),
        "--deepspeed",
        zero2,
        "--out",
        str(tmp_path),
    ]
    env.update({data.CACHE_ENV: str(cache), "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=REPO)
    assert proc.returncode == 0 and "done at step 1" in proc.stdout, proc.stderr[-3000:]
    from soap_apps.pretrain.ds_backend import one_process_launch_env

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match=r"sets RANK but not WORLD_SIZE, .*run under `torchrun --nproc"):
        one_process_launch_env()


def test_deepspeed_under_srun_or_mpirun_without_a_rank_is_refused(monkeypatch):
    """Several processes started by srun or mpirun, none given RANK: each would set itself up as the
    one rank of a one-process run and train alone into the same --out."""
    from soap_apps.pretrain.ds_backend import LAUNCH_ENV, one_process_launch_env

    launched = (*LAUNCH_ENV, "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    environ = {k: v for k, v in os.environ.items() if k not in launched}
    monkeypatch.setattr(os, "environ", environ)  # what it sets stays out of the other tests
    environ["OMPI_COMM_WORLD_SIZE"] = "4"
    with pytest.raises(ConfigError, match=r"one of several \(OMPI_COMM_WORLD_SIZE=4\).*with `deepspeed`"):
        one_process_launch_env()
    environ.update(OMPI_COMM_WORLD_SIZE="1", SLURM_NTASKS="1")  # one task: runs as one process
    one_process_launch_env()
    assert environ["RANK"] == "0" and environ["WORLD_SIZE"] == "1"


def test_parallel_with_deepspeed_is_refused(capsys):
    """--parallel was ignored under --deepspeed, silently."""
    sys.path.insert(0, str(REPO / "launchers"))
    import pretrain

    assert pretrain.main(["--deepspeed", "configs/deepspeed/zero2.json", "--parallel", "single"]) == 2
    assert "--parallel single with --deepspeed" in capsys.readouterr().err
