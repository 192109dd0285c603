"""The pre-training launcher (launchers/pretrain.py, soap_apps.pretrain): config, schedule, data,
model, gradient clipping under FSDP2, and the launcher end to end at world 2 (FSDP2 with a resume,
and DeepSpeed ZeRO-2). Process start-up dominates the cost: the world-2 checks are few and tiny.
Every test uses a temporary cache directory (SOAP_DIST_CACHE), never the home directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soap_apps.pretrain import data, parallel
from soap_apps.pretrain.config import Config, ConfigError, DataConfig, ModelConfig, load_config
from soap_apps.pretrain.metrics import read_records
from soap_apps.pretrain.model import GPT, export, lm_loss, load_exported
from soap_apps.pretrain.optim import param_groups
from soap_apps.pretrain.trainer import run
from soap_apps.schedule import lr_at

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "launchers" / "pretrain.py"
TINY = REPO / "configs" / "pretrain" / "tiny-cpu.yaml"
# a model small enough that a world-2 step takes milliseconds
SMALL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.seq_len=32",
    "optim.block_size=16",
    "train.micro_batch=4",
    "train.log_every=1",
    "train.eval_batches=2",
    "train.threads=1",
]

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One token cache for the module (the standard library corpus is prepared once, ~0.5 s)."""
    path = tmp_path_factory.mktemp("soap_dist_cache")
    old = os.environ.get(data.CACHE_ENV)
    os.environ[data.CACHE_ENV] = str(path)
    yield path
    if old is None:
        os.environ.pop(data.CACHE_ENV, None)
    else:
        os.environ[data.CACHE_ENV] = old


# ----- config -----
def test_config_file_and_overrides():
    cfg = load_config(
        TINY, ["train.steps=20", "optim.lr=1e-3", "optim.betas=[0.9, 0.99]", ("data.path", "x/y")]
    )
    assert cfg.train.steps == 20 and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.data.path == "x/y" and cfg.model.d_model == 128 and cfg.parallel.mode == "fsdp2"
    assert load_config(None, ["optim.block_size=null"]).optim.block_size is None
    assert isinstance(load_config(None, ["optim.lr=3"]).optim.lr, float)
    assert Config().to_dict()["optim"]["betas"] == [0.95, 0.95]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.stepz=3"], r"unknown config key 'train.stepz'.*the keys of 'train' are: steps"),
        (["trian.steps=3"], r"unknown config key 'trian.steps'.*section one of model, data"),
        (["steps=3"], r"unknown config key 'steps'"),
        (["train.steps"], r"section.key=value"),
        (["train.steps=ten"], r"train.steps must be an integer, got 'ten'"),
        (["train.steps=2.5"], r"train.steps must be an integer"),
        (["train.bf16=1"], r"train.bf16 must be true or false"),
        (["optim.betas=[0.9]"], r"optim.betas must be a list of 2 numbers"),
        (["optim.name=sgd"], r"optim.name must be 'soap' or 'adamw', got 'sgd'"),
        (["model.n_heads=3"], r"model.d_model must be a multiple of model.n_heads \(3\)"),
        (["train.steps=0"], r"train.steps must be >= 1, got 0"),
        (["parallel.mode=fsdp"], r"parallel.mode must be 'fsdp2' or 'ddp' or 'hsdp' or 'single'"),
        (["data.eval_fraction=1.5"], r"data.eval_fraction must be in \(0, 1\)"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, overrides)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 5\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'train.warmup' \(in {bad}\)"):
        load_config(bad)
    bad.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_launcher_reports_config_errors_without_a_traceback(capsys):
    sys.path.insert(0, str(LAUNCHER.parent))
    try:
        import pretrain as launcher
    finally:
        sys.path.pop(0)
    assert launcher.main(["--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.stepz'" in err and "Traceback" not in err


# ----- schedule -----
def test_warmup_then_cosine():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(1, **kw) == pytest.approx(0.1) and lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    no_warmup = dict(lr=2.0, warmup_steps=0, total_steps=5, min_lr_ratio=0.0)  # the cosine starts at step 0
    assert lr_at(1, **no_warmup) == pytest.approx(1.0 + math.cos(math.pi / 5)) and lr_at(5, **no_warmup) == 0
    with pytest.raises(ValueError, match="step must be >= 1"):
        lr_at(0, **kw)


# ----- data -----
def _barrier_counter():
    calls = []
    return calls, lambda: calls.append(1)


def test_stdlib_corpus_is_prepared_once_into_the_cache(cache):
    calls, barrier = _barrier_counter()
    path, byte_level = data.prepare_tokens(DataConfig(), writer=True, barrier=barrier)
    assert byte_level and path.parent == cache and path.name.startswith("stdlib-py")
    files = data.stdlib_files()
    assert not any("site-packages" in p.parts for p in files)
    tokens = np.fromfile(path, dtype=np.uint16)
    head = files[0].read_bytes()
    assert np.array_equal(tokens[: len(head)], np.frombuffer(head, dtype=np.uint8))
    assert len(tokens) == sum(p.stat().st_size for p in files) > 1_000_000
    mtime = path.stat().st_mtime_ns
    assert data.prepare_tokens(DataConfig(), writer=True, barrier=barrier)[0] == path
    assert path.stat().st_mtime_ns == mtime and len(calls) == 2  # not rewritten; every call waits
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_text_directory_and_bin_sources(tmp_path, cache):
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "b.txt").write_bytes(b"second file\n")
    (texts / "a.txt").write_bytes(b"first\n")
    (texts / "sub" / "c.md").write_bytes(b"\xc3\xa9t\xc3\xa9\n")
    (texts / ".hidden").write_bytes(b"never read")
    cfg = DataConfig(path=str(texts))
    path, byte_level = data.prepare_tokens(cfg, writer=True, barrier=lambda: None)
    assert byte_level and path.parent == cache
    assert (
        np.fromfile(path, dtype=np.uint16).tobytes()
        == np.frombuffer(b"first\nsecond file\n\xc3\xa9t\xc3\xa9\n", dtype=np.uint8)
        .astype(np.uint16)
        .tobytes()
    )
    (texts / "a.txt").write_bytes(b"first, edited\n")
    assert data.prepare_tokens(cfg, writer=True, barrier=lambda: None)[0] != path  # a new cache key

    ids = np.arange(5000) % 1000
    bin_path = tmp_path / "tokens.bin"
    ids.astype(np.uint16).tofile(bin_path)
    got, byte_level = data.prepare_tokens(DataConfig(path=str(bin_path)), writer=True, barrier=lambda: None)
    assert got == bin_path and not byte_level
    splits = data.load_splits(bin_path, eval_fraction=0.1, seq_len=16, vocab_size=1000, byte_level=False)
    assert len(splits.train) == 4500 and len(splits.eval) == 500 and splits.eval[0] == ids[4500]
    with pytest.raises(ConfigError, match="holds token id 999, but model.vocab_size=500"):
        data.load_splits(bin_path, eval_fraction=0.1, seq_len=16, vocab_size=500, byte_level=False)
    with pytest.raises(ConfigError, match="model.vocab_size=100 is too small for byte-level data"):
        data.load_splits(path, eval_fraction=0.1, seq_len=4, vocab_size=100, byte_level=True)
    with pytest.raises(ConfigError, match="held-out split has 5 tokens.*raise data.eval_fraction"):
        data.load_splits(bin_path, eval_fraction=0.001, seq_len=16, vocab_size=1000, byte_level=False)
    with pytest.raises(ConfigError, match="data.path='.*nope' is neither a directory"):
        data.prepare_tokens(DataConfig(path=str(tmp_path / "nope")), writer=True, barrier=lambda: None)


def test_batches_are_slices_of_one_seeded_global_order():
    tokens = np.arange(10_000, dtype=np.uint16)

    def sampler(rank, world, micro, accum, seed=3):
        return data.BatchSampler(
            tokens, seq_len=8, micro_batch=micro, grad_accum=accum, rank=rank, world=world, seed=seed
        )

    one = sampler(0, 1, 4, 2)  # global batch 8 in one process ...
    two = [sampler(r, 2, 4, 1) for r in range(2)]  # ... is what two ranks of micro batch 4 read
    for _ in range(3):
        x1 = torch.cat([x for x, _ in one.next_step()])
        x2 = torch.cat([s.next_step()[0][0] for s in two])
        assert torch.equal(x1, x2)
    x, y = sampler(0, 1, 4, 1).next_step()[0]
    assert (
        x.shape == (4, 8)
        and torch.equal(x[:, 1:], y[:, :-1])
        and torch.equal(x % 8, x[:, :1] % 8 + torch.arange(8))
    )
    assert not torch.equal(x, sampler(0, 1, 4, 1, seed=4).next_step()[0][0])

    a = sampler(1, 2, 4, 2)
    for _ in range(200):  # past an epoch (1249 windows)
        a.next_step()
    b = sampler(1, 2, 4, 2)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.next_step()[1], b.next_step()[1], strict=True))
    with pytest.raises(ConfigError, match="seed=3, this run 4"):
        sampler(0, 1, 4, 1, seed=4).load_state_dict(a.state_dict())

    ev = [data.eval_batches(tokens, seq_len=8, micro_batch=2, n_batches=3, rank=r, world=2) for r in range(2)]
    assert len(ev[0]) == 3 and ev[0][0][0].shape == (2, 8)
    assert not torch.equal(ev[0][0][0], ev[1][0][0])


# ----- model -----
def test_model_shapes_groups_and_export(tmp_path):
    cfg = ModelConfig(vocab_size=300, seq_len=16, d_model=32, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 300, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, 300)
    assert lm_loss(logits, idx).item() == pytest.approx(math.log(300), rel=0.05)  # ~uniform at init
    with pytest.raises(ValueError, match="more than model.seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert model.head.weight.data_ptr() != model.tok.weight.data_ptr()  # untied
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert "tok.weight" in decay["param_names"] and "blocks.0.ln1.weight" in no_decay["param_names"]

    export(model.state_dict(), cfg, tmp_path / "final", step=7)
    for path in (tmp_path / "final", tmp_path / "final" / "model.pt"):
        loaded = load_exported(path)
        assert loaded.cfg == cfg and torch.equal(loaded(idx), logits)
    assert json.loads((tmp_path / "final" / "config.json").read_text())["step"] == 7
    with pytest.raises(FileNotFoundError, match="pass the final/ directory"):
        load_exported(tmp_path)


# ----- gradient clipping under FSDP2 -----
def _clip_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    env = parallel.DistEnv(
        rank=rank, world=world, local_rank=rank, local_world=world, device=torch.device("cpu")
    )
    # odd sizes: uneven shards (pos: 9 rows -> 5/4; qkv: 3 * 24 = 72 rows; head 257 rows -> 129/128)
    cfg = ModelConfig(vocab_size=257, seq_len=9, d_model=24, n_layers=2, n_heads=2)
    x = torch.randint(0, 257, (4, 9), generator=torch.Generator().manual_seed(1))
    results = {}
    for mode, shard in (("fsdp2", None), ("hsdp", 1), ("ddp", None)):
        torch.manual_seed(0)
        model = GPT(cfg)
        reference = copy.deepcopy(model)
        wrapped = parallel.wrap_model(model, mode, env, hsdp_shard_size=shard)
        lm_loss(wrapped(x[:, :-1]), x[:, 1:]).backward()  # the same batch on both ranks
        lm_loss(reference(x[:, :-1]), x[:, 1:]).backward()
        norm = parallel.clip_grad_norm(wrapped.parameters(), 0.05)
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        grads = [
            p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in wrapped.parameters()
        ]
        err = max((g - r.grad).abs().max().item() for g, r in zip(grads, reference.parameters(), strict=True))
        sharded = type(next(wrapped.parameters())).__name__
        results[mode] = {
            "norm": norm.item(),
            "ref": ref_norm.item(),
            "grad_err": err,
            "type": sharded,
            "plain_tensor": type(norm) is torch.Tensor,
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_clip_grad_norm_under_fsdp2_equals_the_unsharded_norm():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_clip_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for res in ranks:
        assert res["fsdp2"]["type"] == "DTensor" and res["ddp"]["type"] == "Parameter"
        for mode, r in res.items():
            assert r["plain_tensor"], mode
            assert r["norm"] == pytest.approx(r["ref"], rel=1e-5), mode
            assert r["norm"] > 0.05 and r["grad_err"] < 1e-7, mode  # clipping happened, the same way


# ----- metrics -----
def test_elapsed_s_continues_across_a_resume(tmp_path):
    """Issue 13: a resumed run's elapsed_s restarted from 0, so time plots of split runs went backwards."""
    from soap_apps.pretrain.metrics import Metrics

    env = parallel.DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    records = [
        {"step": s, "loss": 3.0, "lr": 0.1, "grad_norm": 1.0, "tokens": s, "tokens_per_s": 1, "elapsed_s": e}
        for s, e in ((1, 40.0), (2, 100.0), (3, 160.0))
    ]  # step 3 is past the checkpoint: dropped
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = Metrics(tmp_path, env, start_step=2, total_steps=4, tokens_per_step=1, log_every=1)
    metrics.log_train(3, torch.tensor(2.0), torch.tensor(1.0), 1e-3, force=False)
    metrics.close(plot=False)
    elapsed = [r["elapsed_s"] for r in read_records(tmp_path / "metrics.jsonl")]
    assert elapsed[:2] == [40.0, 100.0] and 100.0 < elapsed[2] < 130.0, elapsed


# ----- the DeepSpeed JSON's optimizer params -----
def _ds_json(tmp_path: Path, params: dict, kind: str = "SOAP") -> Path:
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    ds["optimizer"] = {"type": kind, "params": params}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


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
        "refresh_delay, fused"
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
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-3, "eps": 1e-8, "weight_decay": 0.01,
                                                           "betas": [0.95, 0.95]}}  # fmt: skip
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
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
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
    with pytest.raises(ConfigError, match=r"whole already holds a run \(checkpoints/, config.yaml, final/"):
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
    assert f"{out} already holds a run (checkpoints/, config.yaml, ds_config.json" in proc.stderr
    assert "pass --resume to continue that run, or --out another directory" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
