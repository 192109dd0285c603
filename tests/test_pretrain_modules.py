"""The pre-training package's modules one at a time (soap_apps.pretrain): config, schedule, data,
model, gradient clipping under FSDP2 (world 2, tiny) and the metrics' clock across a resume. The
launcher end to end is tests/test_pretrain_launcher.py. Every test uses a temporary cache directory
(SOAP_DIST_CACHE), never the home directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pretrain_helpers import LAUNCHER, TINY, temporary_cache

from soap_apps.pretrain import data, parallel
from soap_apps.pretrain.config import Config, ConfigError, DataConfig, ModelConfig, load_config
from soap_apps.pretrain.metrics import held_out_change, read_records
from soap_apps.pretrain.model import GPT, export, lm_loss, load_exported
from soap_apps.pretrain.optim import param_groups
from soap_apps.schedule import lr_at

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One token cache for the module (the standard library corpus is prepared once, ~0.5 s)."""
    yield from temporary_cache(tmp_path_factory)


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


def test_the_held_out_windows_are_one_set_for_every_split_of_the_global_batch():
    """Before, the set followed micro_batch * world: at world 2, a model equal to one process's scored
    1.7% apart on its held-out loss."""
    tokens = np.arange(10_000, dtype=np.uint16)

    def windows(micro, accum, world, n_batches=3):
        shares = [
            data.eval_batches(
                tokens,
                seq_len=8,
                micro_batch=micro,
                grad_accum=accum,
                n_batches=n_batches,
                rank=r,
                world=world,
            )
            for r in range(world)
        ]
        for share in shares:  # equal shares of whole micro-batches: the mean over ranks is the set's
            assert len(share) == n_batches * accum and all(x.shape == (micro, 8) for x, _ in share)
        return torch.cat([x for share in shares for x, _ in share])

    one = windows(micro=8, accum=2, world=1)  # global batch 16
    assert one.shape == (3 * 16, 8) and len(set(one[:, 0].tolist())) == 48
    for micro, accum, world in ((8, 1, 2), (4, 2, 2), (2, 2, 4), (16, 1, 1)):
        assert torch.equal(windows(micro, accum, world), one), (micro, accum, world)
    assert not torch.equal(windows(8, 1, 1), one[:24])  # another global batch: another set


def test_a_resume_says_when_its_held_out_losses_score_another_set(tmp_path, capsys):
    rows = [
        {"step": 4, "loss": 2.0},
        {"step": 4, "eval_loss": 2.1, "eval_windows": 64},
        {"step": 5, "loss": 1.9},
    ]
    assert held_out_change(rows, 64) is None
    assert held_out_change([{"step": 4, "loss": 2.0}], 64) is None  # nothing held out yet
    assert "from here on score 128 windows, those through step 4 scored 64" in held_out_change(rows, 128)
    old = [{"step": 4, "eval_loss": 2.1}]  # before the records said it: the unit of eval_batches changed
    assert "counted micro-batches per rank" in held_out_change(old, 64, eval_windows_before=32)
    assert held_out_change(old, 64, eval_windows_before=64) is None  # grad_accum 1: the same set
    from soap_apps.pretrain.metrics import Metrics

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = parallel.DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    for windows in (64, 128):  # a resume at the same settings says nothing
        Metrics(
            tmp_path, env, start_step=4, total_steps=8, tokens_per_step=1, log_every=1, eval_windows=windows
        ).close(plot=False)
    said = [line for line in capsys.readouterr().out.splitlines() if "held-out" in line]
    assert len(said) == 1 and said[0].startswith("pretrain: the held-out losses from here on score 128"), said


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
    dist.barrier()  # every rank has saved
    os._exit(0)  # no group teardown: gloo's has aborted a process after its results were saved


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


def test_the_placement_line_names_what_owner_leaves_spread():
    from types import SimpleNamespace

    from soap_apps.pretrain.trainer import _soap_placement

    def backend(stats):
        return SimpleNamespace(optimizer=SimpleNamespace(stats=lambda: stats))

    assert _soap_placement(backend({"placement": "owner", "spread_params": []})) == "owner"
    spread = {"placement": "owner", "spread_params": ["tok.weight", "head.weight"]}
    assert _soap_placement(backend(spread)) == "owner (tok.weight, head.weight spread over the shards)"
    hsdp = {"placement": "owner", "spread_params": [], "owner_grid": [2, 2]}  # owners over the mesh
    assert _soap_placement(backend(hsdp)) == "owner over 2 x 2 ranks"
    assert _soap_placement(backend({**hsdp, "owner_grid": [1, 4]})) == "owner"
    assert _soap_placement(backend({"built": False})) == ""  # falsy: the launcher prints nothing
    assert _soap_placement(SimpleNamespace()) is None  # AdamW and DeepSpeed


def test_an_older_checkpoint_without_saved_phases_loads_with_them_recomputed(tmp_path):
    """DCP refuses a template key the checkpoint lacks: refresh_phase (saved by newer versions only)
    is dropped from the template where the checkpoint has none, with a warning; kept where it has."""
    from soap_apps.pretrain.checkpoint import _drop_unsaved_phases

    def template():
        entry = {"step": torch.tensor(4.0), "refresh_phase": torch.tensor(1.0)}
        return {"state": {"w": dict(entry), "b": {"step": torch.tensor(4.0)}}, "param_groups": []}

    old = template()
    with pytest.warns(UserWarning, match="no refresh_phase .* recomputed"):
        _drop_unsaved_phases(tmp_path, old, {"optim.state.w.step", "optim.state.b.step"})
    assert "refresh_phase" not in old["state"]["w"] and "step" in old["state"]["w"]
    new = template()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _drop_unsaved_phases(tmp_path, new, {"optim.state.w.step", "optim.state.w.refresh_phase"})
    assert "refresh_phase" in new["state"]["w"]


def test_a_killed_preparations_temporary_file_is_swept_and_a_live_ones_kept(tmp_path):
    """SIGKILL skips write_tokens' cleanup: each killed preparation left a corpus-sized file in the cache."""
    import socket
    import subprocess
    import sys

    script = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)  # ended: pid free
    host = socket.gethostname()
    killed = tmp_path / f".text-x.bin.{host}.{int(dead.stdout)}.tmp"
    running = tmp_path / f".text-y.bin.{host}.{os.getpid()}.tmp"  # a live preparation's
    elsewhere = tmp_path / f".text-z.bin.another-host.{int(dead.stdout)}.tmp"  # its host's to judge
    for path in (killed, running, elsewhere):
        path.write_bytes(b"partial")
    data.write_tokens(np.arange(10, dtype=np.uint16), tmp_path / "text-new.bin")
    assert not killed.exists() and running.exists() and elsewhere.exists()
