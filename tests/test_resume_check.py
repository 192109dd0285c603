"""--resume against a changed configuration, and an interrupted run (soap_apps.pretrain.resume_check,
launchers/pretrain.py): a config that differs from the run's config.yaml in a key the checkpoint
depends on is one error naming every such key, before anything is loaded; Ctrl-C and SIGTERM end a
run with one line (the step, the newest complete checkpoint, the command that continues) and exit
codes 130 and 143. The comparisons need no training; the end-to-end runs are tiny.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pretrain_helpers import LAUNCHER, REPO, SMALL_MODEL, TINY, launch_ranks, temporary_cache

from soap_apps.jsonl import read_records
from soap_apps.pretrain import checkpoint, parallel
from soap_apps.pretrain.config import ConfigError, load_config, save_config
from soap_apps.pretrain.resume_check import (
    MAY_CHANGE,
    Terminated,
    check_resume_config,
    check_stop_after,
    interrupt_in,
    resume_command,
)

pytestmark = pytest.mark.filterwarnings("ignore")

SMALL = [*SMALL_MODEL, "data.eval_fraction=0.1"]  # as in tests/test_launcher_errors.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    yield from temporary_cache(tmp_path_factory)


def _saved_run(tmp_path: Path, *overrides: str, config: bool = True) -> Path:
    """A run directory as a run leaves it: config.yaml and a complete DCP checkpoint (its .metadata)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_2").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_2" / ".metadata").write_bytes(b"")
    if config:
        save_config(load_config(TINY, [*SMALL, *overrides]), run_dir / "config.yaml")
    return run_dir


# ----- the configuration check -----
def test_resume_names_every_key_the_checkpoint_depends_on(tmp_path):
    run_dir = _saved_run(tmp_path)
    now = load_config(
        TINY,
        [
            *SMALL,
            "model.d_model=64",
            "optim.block_size=null",
            "optim.refresh_delay=1",
            "optim.refresh_schedule=staggered",
            "optim.weight_decay=0.1",
            "optim.betas=[0.9,0.95]",
            "data.path=/elsewhere",
            "train.steps=1000",  # may change: not named
            "optim.lr=1e-4",
        ],
    )
    with pytest.raises(ConfigError) as error:
        check_resume_config(now, run_dir)
    message = str(error.value)
    assert message.startswith(
        f"--resume: this configuration differs from the run's {run_dir / 'config.yaml'} in keys its "
        "checkpoints depend on: model.d_model (saved 32, now 64), data.path (saved null, now "
        '"/elsewhere"), optim.block_size (saved 16, now null), optim.refresh_delay (saved 0, now 1), '
        'optim.refresh_schedule (saved "all", now "staggered"); '
        "and in optimizer hyperparameters the checkpoint restores (a new value would be ignored): "
        "optim.betas (saved [0.95, 0.95], now [0.9, 0.95]), optim.weight_decay (saved 0.01, now 0.1). "
        "Resume with the saved values, or pass --out another directory to start a new run; "
    )
    assert message.endswith(MAY_CHANGE) and "train.steps (" not in message and "optim.lr (" not in message


def test_resume_allows_what_the_loop_reads_afresh(tmp_path):
    """The step count, cadences, lr and schedule, batch and threads, the parallel layout and SOAP's
    execution options (not its state's layout) may all change."""
    run_dir = _saved_run(tmp_path)
    changed = [
        "train.steps=1000",
        "train.log_every=3",
        "train.eval_every=7",
        "train.checkpoint_every=5",
        "train.keep_checkpoints=null",
        "train.threads=2",
        "train.micro_batch=8",
        "train.grad_accum=2",
        "train.eval_batches=4",
        "train.bf16=false",
        "optim.lr=1e-4",
        "optim.grad_clip=null",
        "optim.fused=false",
        "optim.basis_dtype=bfloat16",
        "schedule.warmup_steps=5",
        "schedule.min_lr_ratio=0.5",
        "parallel.mode=ddp",
        "data.cache_dir=/tmp/elsewhere",
    ]
    check_resume_config(load_config(TINY, [*SMALL, *changed]), run_dir)


def test_resume_compares_soap_options_only_between_soap_runs(tmp_path):
    adamw = _saved_run(tmp_path, "optim.name=adamw")
    check_resume_config(load_config(TINY, [*SMALL, "optim.name=adamw", "optim.block_size=8"]), adamw)
    with pytest.raises(
        ConfigError, match=r"depend on: optim.name \(saved \"adamw\", now \"soap\"\)\. Resume"
    ):
        check_resume_config(load_config(TINY, [*SMALL, "optim.block_size=8"]), adamw)


def test_resume_check_is_skipped_without_config_or_checkpoint(tmp_path, capsys):
    other = load_config(TINY, [*SMALL, "model.d_model=64"])
    check_resume_config(other, _saved_run(tmp_path / "old", config=False))  # an older run: no config.yaml
    fresh = tmp_path / "fresh"  # no checkpoint: --resume starts afresh, whatever config.yaml says
    fresh.mkdir()
    save_config(load_config(TINY, SMALL), fresh / "config.yaml")
    check_resume_config(other, fresh)
    unknown = _saved_run(tmp_path / "unknown")  # another version's: skipped, with a warning
    (unknown / "config.yaml").write_text("model:\n  d_model: 32\n  rotary: true\n")
    check_resume_config(other, unknown)
    assert "pretrain: warning: --resume: cannot compare with" in capsys.readouterr().err
    deepspeed = tmp_path / "ds"  # DeepSpeed's checkpoints count too
    (deepspeed / "checkpoints" / "step_2").mkdir(parents=True)
    (deepspeed / "checkpoints" / "latest").write_text("step_2")
    save_config(load_config(TINY, SMALL), deepspeed / "config.yaml")
    with pytest.raises(ConfigError, match=r"model.d_model \(saved 32, now 64\)"):
        check_resume_config(other, deepspeed)


def _launcher():
    sys.path.insert(0, str(LAUNCHER.parent))
    try:
        return __import__("pretrain")
    finally:
        sys.path.pop(0)


def _sets(*overrides: str) -> list[str]:
    return [arg for o in (*SMALL, *overrides) for arg in ("--set", o)]


def test_launcher_refuses_a_changed_resume_before_loading(tmp_path, texts, cache, one_process, capsys):
    """The errors that used to come from deep inside DCP (a size mismatch, a missing param_groups
    key) are one line naming the key; more steps and another lr still resume."""
    out = tmp_path / "run"
    argv = [*_sets("train.steps=2", "train.log_every=1"), "--data", str(texts), "--out", str(out)]
    assert _launcher().main(argv) == 0
    capsys.readouterr()
    for extra, named in (
        (["--set", "model.d_model=64"], "model.d_model (saved 32, now 64)"),
        (["--optimizer", "adamw"], 'optim.name (saved "soap", now "adamw")'),
        (["--set", "optim.block_size=8"], "optim.block_size (saved 16, now 8)"),
    ):
        assert _launcher().main([*argv, "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert (
            f"launchers/pretrain.py: error: --resume: this configuration differs from the run's {out}" in err
        )
        assert named in err
    # --stop-after before the checkpoint: refused, naming its step (it used to "finish" garbled)
    assert _launcher().main([*argv, "--resume", "--steps", "3", "--stop-after", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--stop-after 1 is not past the checkpoint being resumed, {out / 'checkpoints' / 'step_2'}" in err
    assert "(step 2): pass --stop-after a step in [3, 3] (train.steps), or leave it out" in err
    assert _launcher().main([*argv, "--resume", "--steps", "3", "--set", "optim.lr=1e-3"]) == 0
    assert [r["step"] for r in read_records(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert load_config(out / "config.yaml").optim.lr == 1e-3


def test_check_stop_after_lets_through_only_a_step_past_the_checkpoint(tmp_path):
    for stop_after, latest in ((None, 5), (6, 5), (3, None), (8, 8)):  # (8, 8): a finished run reports
        check_stop_after(stop_after, latest, 8, tmp_path)
    with pytest.raises(ConfigError, match=r"step_5 \(step 5\): pass --stop-after a step in \[6, 8\]"):
        check_stop_after(5, 5, 8, tmp_path)
    with pytest.raises(ConfigError, match=r"step_8 \(step 8, the run is finished\): leave --stop-after out"):
        check_stop_after(4, 8, 8, tmp_path)


# ----- interrupts -----
def test_resume_command_and_interrupt_in():
    argv = ["--set", "train.steps=9", "--out", "a", "--resume", "--local_rank=1", "--out=b"]
    assert resume_command("launchers/pretrain.py", argv, Path("runs/x"), False) == (
        "python launchers/pretrain.py --set train.steps=9 --out runs/x --resume"
    )
    assert resume_command("p.py", ["--local_rank", "0"], Path("r"), True) == (
        "the same torchrun (or deepspeed) command with p.py --out r --resume"
    )
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    stop = KeyboardInterrupt()
    assert interrupt_in(stop) is stop  # DCP wraps an interrupt during a save or a load:
    assert interrupt_in(CheckpointException("save", {0: _wrap_exception(stop)})) is stop
    assert interrupt_in(RuntimeError("boom")) is None


def test_sigterm_handler_raises_terminated_and_is_restored():
    pretrain = _launcher()

    def mine(signum, frame):
        raise AssertionError("the launcher's handler should be in place")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(Terminated), pretrain.sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode: never reached
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def _complete_checkpoints(out: Path) -> list[Path]:
    return [checkpoint.step_dir(out, s) for s in checkpoint.checkpoint_steps(out)]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_says_what_was_kept(tmp_path, texts, cache, one_process, sig, code):
    """A run far from its end gets the signal once its first checkpoint is complete: it exits with
    128 + the signal's number and one line on stderr; metrics.jsonl is whole and the run resumes."""
    out = tmp_path / "run"
    steps = 1_000_000
    args = [*_sets(f"train.steps={steps}", "train.checkpoint_every=2", "train.log_every=1")]
    args += ["--data", str(texts), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCHER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SOAP_DIST_CACHE": str(cache)},
        # Ctrl-C's default action, even where this test runs with SIGINT ignored (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not _complete_checkpoints(out):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        proc.send_signal(sig)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # an interrupt raised inside a __del__ is dropped by Python
            proc.send_signal(sig)
            stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    name = signal.Signals(sig).name
    held = f"pretrain: {name} during the checkpoint of step "  # the signal came during a save
    lines = [line for line in stderr.splitlines() if line.startswith("pretrain:") and held not in line]
    assert len(lines) == 1, stderr
    found = re.fullmatch(
        rf"pretrain: interrupted by {name} at step (\d+) of {steps} \(no checkpoint is written on an "
        r"interrupt\); the newest complete checkpoint is (\S+); to continue: python (.*)",
        lines[0],
    )
    assert found, lines[0]
    at, kept, command = int(found.group(1)), Path(found.group(2)), found.group(3)
    assert kept == _complete_checkpoints(out)[-1] and int(kept.name.removeprefix("step_")) <= at
    assert command.endswith(f"--data {texts} --out {out} --resume")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all("step" in r for r in records)
    # the hint's command continues the run (one more step here)
    saved = int(kept.name.removeprefix("step_"))
    assert _launcher().main([*args, "--resume", "--stop-after", str(saved + 1)]) == 0
    assert [r["step"] for r in read_records(out / "metrics.jsonl") if "loss" in r] == list(
        range(1, saved + 2)
    )


# ----- checkpoints cut short -----
def _step_dirs(run_dir: Path, complete: tuple[int, ...], partial: tuple[int, ...]) -> None:
    for step in (*complete, *partial):
        (run_dir / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step_{step}" / "__0_0.distcp").write_bytes(b"x")
    for step in complete:
        (run_dir / "checkpoints" / f"step_{step}" / ".metadata").write_bytes(b"")


def test_prune_counts_only_complete_checkpoints(tmp_path):
    """A save cut short (no .metadata) never pushes a complete checkpoint out: older partial ones go
    with the pruned, a newer one is left alone, and the newest complete ones stay."""
    env = parallel.DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    _step_dirs(tmp_path, complete=(10, 20, 35), partial=(15, 30, 40))
    checkpoint.prune(tmp_path, 1, env)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_35", "step_40"]
    assert checkpoint.checkpoint_steps(tmp_path) == [35]
    checkpoint.prune(tmp_path, None, env)  # null keeps all
    checkpoint.prune(tmp_path / "none", 2, env)  # no checkpoints directory: nothing to do
    assert checkpoint.checkpoint_steps(tmp_path) == [35]
    ds = tmp_path / "ds"  # DeepSpeed: complete up to the step its `latest` names
    _step_dirs(ds, complete=(), partial=(8, 10, 12, 14))
    (ds / "checkpoints" / "latest").write_text("step_12")
    checkpoint.prune(ds, 2, env, deepspeed=True)
    assert sorted(p.name for p in (ds / "checkpoints").iterdir()) == [
        "latest",
        "step_10",
        "step_12",
        "step_14",
    ]


def _tiny_checkpoint(run_dir: Path, *steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    env = parallel.DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for step in steps:
        checkpoint.save(checkpoint.step_dir(run_dir, step), model, optimizer, {"step": step}, env)
    return model, optimizer


@pytest.mark.parametrize(
    ("damage", "cause"),
    [
        (lambda d: (d / "__0_0.distcp").unlink(), "FileNotFoundError"),
        (lambda d: os.truncate(d / "__0_0.distcp", 100), "on rank 0: "),
        (lambda d: os.truncate(d / ".metadata", 50), "Error"),
    ],
)
def test_an_unreadable_checkpoint_is_one_error_naming_it_and_the_fix(tmp_path, damage, cause):
    """A damaged or partly deleted checkpoint: one ConfigError (exit 2 in the launcher) naming the
    directory, the cause in one line, and the previous complete checkpoint to fall back on."""
    env = parallel.DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    model, optimizer = _tiny_checkpoint(tmp_path, 2, 4)
    damage(checkpoint.step_dir(tmp_path, 4))
    with pytest.raises(ConfigError) as raised:
        checkpoint.load(checkpoint.step_dir(tmp_path, 4), model, optimizer, {"step": 0}, env)
    message = str(raised.value)
    assert "\n" not in message and cause in message, message
    assert f"the checkpoint {checkpoint.step_dir(tmp_path, 4)} is unreadable (" in message
    assert f"delete that directory and resume again (--resume then continues from {tmp_path}" in message
    assert message.endswith("step_2)")
    assert checkpoint.load(checkpoint.step_dir(tmp_path, 2), model, optimizer, {"step": 0}, env) == {
        "step": 2
    }
    damage(checkpoint.step_dir(tmp_path, 2))  # no earlier one: says the run starts again
    with pytest.raises(ConfigError, match="no earlier complete checkpoint, so --resume then starts the run"):
        checkpoint.load(checkpoint.step_dir(tmp_path, 2), model, optimizer, {"step": 0}, env)


def test_an_intact_checkpoint_that_does_not_fit_is_not_called_damaged(tmp_path):
    """A checkpoint whose files are whole but whose shapes differ from the model (another model, or a
    world size the layout cannot reshard): the cause in one line, and no advice to delete it."""
    env = parallel.DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    _tiny_checkpoint(tmp_path, 2, 4)
    wider = torch.nn.Linear(4, 8)
    optimizer = torch.optim.AdamW(wider.parameters())
    wider(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    with pytest.raises(ConfigError) as raised:
        checkpoint.load(checkpoint.step_dir(tmp_path, 4), wider, optimizer, {"step": 0}, env)
    message = str(raised.value)
    assert "could not load the checkpoint" in message and "Size mismatch" in message, message
    assert "delete" not in message and "keep it" in message, message


# ----- DeepSpeed checkpoints cut short -----
@pytest.fixture(scope="module")
def ds_run(tmp_path_factory, cache) -> tuple[Path, list[str]]:
    """A world-2 ZeRO-2 run with checkpoints at steps 2 and 4, and the arguments it was run with."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("ds_run")
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text("hello soap " * 400)
    args = _sets("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=null")
    args += ["--data", str(root / "texts"), "--deepspeed", str(REPO / "configs" / "deepspeed" / "zero2.json")]
    ranks = launch_ranks([*args, "--out", str(root / "run")], world=2)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-3000:] for r in ranks]
    return root / "run", args


def _resumed(ds_run: tuple[Path, list[str]], tmp_path: Path, damage: Any, world: int) -> tuple[Path, list]:
    """A copy of ``ds_run``'s directory, its step-4 checkpoint given to ``damage``, resumed by ``world``
    ranks."""
    out = tmp_path / "run"
    shutil.copytree(ds_run[0], out)
    damage(checkpoint.step_dir(out, 4))
    return out, launch_ranks([*ds_run[1], "--out", str(out), "--resume"], world)


def _one_line(rank: subprocess.CompletedProcess) -> str:
    assert rank.returncode == 2 and "Traceback" not in rank.stderr, rank.stderr[-3000:]
    lines = rank.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launchers/pretrain.py: error: --resume: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("damage", "cause", "failing"),
    [  # rank 1 alone reads its optimizer states: rank 0 used to wait for it in a collective
        (
            lambda d: os.truncate(d / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 1000),
            "EOFError: zero_pp",
            [1],
        ),
        (lambda d: (d / "mp_rank_00_model_states.pt").unlink(), "FileNotFoundError", [0, 1]),
    ],
)
def test_an_unreadable_deepspeed_checkpoint_is_one_line_on_every_rank(
    ds_run, tmp_path, damage, cause, failing
):
    """Under --deepspeed as under torchrun: a file of the checkpoint cut short or deleted stops every
    rank with one line (exit code 2) naming the checkpoint, the cause and the fix, with no hang and
    none of DeepSpeed's tracebacks."""
    out, ranks = _resumed(ds_run, tmp_path, damage, world=2)
    for rank, proc in enumerate(ranks):
        line = _one_line(proc)
        if rank in failing:
            assert (
                f"the checkpoint {checkpoint.step_dir(out, 4)} is unreadable (on rank {rank}: {cause}" in line
            )
            fix = f"delete that directory and resume again (--resume then continues from {out}/checkpoints"
            assert line.endswith(f"{fix}/step_2)"), line
        else:
            assert line.endswith("(another rank could not read it; see that rank's message)"), line


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda d: None, "(ZeRORuntimeException: The checkpoint being loaded used a DP world size of 2"),
        (lambda d: os.truncate(d / "mp_rank_00_model_states.pt", 0), "is unreadable (on rank 0: EOFError"),
    ],
)
def test_a_deepspeed_checkpoint_says_to_delete_it_only_when_damaged(ds_run, tmp_path, damage, said):
    """One process (no launcher) resuming the world-2 checkpoint: ZeRO cannot repartition it, which
    says to keep it; a file cut short says to delete it."""
    _, (proc,) = _resumed(ds_run, tmp_path, damage, world=1)
    line = _one_line(proc)
    assert said in line, line
    assert ("Its files look whole, so keep it: if the model or the world size changed" in line) != (
        "delete that directory" in line
    ), line


def test_deepspeed_resume_goes_back_once_the_unreadable_checkpoint_is_deleted(ds_run, tmp_path):
    """The fix the message gives works under --deepspeed too, although `latest` still names the
    deleted checkpoint: the run resumes from the one before it, with a warning."""
    out, ranks = _resumed(ds_run, tmp_path, shutil.rmtree, world=2)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-3000:] for r in ranks]
    assert "resuming at step 2" in ranks[0].stdout
    latest = out / "checkpoints" / "latest"
    assert (
        f"warning: --resume: {latest} names step_4, which is gone; resuming from {out}/checkpoints/step_2"
        in ranks[0].stderr
    )
    assert latest.read_text().strip() == "step_4" and checkpoint.step_dir(out, 4).is_dir()  # saved again


def test_a_damaged_deepspeed_latest_says_how_to_mend_it(tmp_path, capsys):
    from soap_apps.pretrain.ds_backend import DeepSpeedBackend

    env = parallel.DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    backend, latest = SimpleNamespace(env=env), tmp_path / "checkpoints" / "latest"
    _step_dirs(tmp_path, complete=(), partial=(2, 4))
    for text in (b"", b"\xff\xfe\x00", b"global_step4"):  # cut short, garbage, another launcher's tag
        latest.write_bytes(text)
        assert checkpoint.formats_present(tmp_path) == ["DeepSpeed"]  # no UnicodeDecodeError on the way
        with pytest.raises(ConfigError) as raised:
            DeepSpeedBackend.latest_checkpoint(backend, tmp_path)
        assert str(raised.value).startswith(f"--resume: {latest} does not name a checkpoint (it holds ")
        assert str(raised.value).endswith("whose save completed (step_2, step_4 are there) and resume again")
    for text, step, warned in (("step_4", 4, False), ("step_6", 4, True), ("step_1", None, True)):
        latest.write_text(text + "\n")
        assert DeepSpeedBackend.latest_checkpoint(backend, tmp_path) == step
        assert (f"{latest} names {text}, which is gone; " in capsys.readouterr().err) == warned
