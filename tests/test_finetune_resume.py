"""launchers/finetune.py and finetune_trainer.py when a run is stopped, resumed or mis-configured:
checkpoints are written whole or not at all, an interrupt says what was kept and how to go on, a
resume with other settings is refused flag by flag, bad SOAP flags and output directories fail
before any work, and --help says each default once. Everything runs in this process: tiny runs
(a 4 KB corpus, 32-byte windows, a few steps) of about a second each.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
from collections.abc import Callable
from pathlib import Path

import finetune_trainer
import pytest
import torch

from soap_apps.finetune import checkpoints, train
from soap_apps.finetune.config import FinetuneConfig, build_parser, parse_args
from soap_apps.finetune.resume import config_differences, setup_difference
from soap_apps.pretrain import resume_check
from soap_dist import SOAP

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_accelerate_state")]
TINY = [
    "--steps", "4", "--batch-size", "2", "--context", "32", "--max-bytes", "4000", "--eval-every", "0",
    "--eval-windows", "2", "--fused", "off", "--precondition-frequency", "2", "--threads", "1",
]  # fmt: skip


def main(argv: list[str]) -> list[dict]:
    """launchers/finetune.py in this process, with a fresh Accelerator state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return train.main(argv)


def run(texts: Path, out: Path, *flags: str) -> list[dict]:
    return main([*TINY, "--data", str(texts), "--output-dir", str(out), *flags])


def exits(capsys, texts: Path, out: Path, *flags: str) -> tuple[int, str]:
    """(exit code, stderr) of a run that ends in SystemExit."""
    with pytest.raises(SystemExit) as exc:
        run(texts, out, *flags)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture(autouse=True)
def sigint_raises():
    """SIGINT as Python sets it up when it starts with SIGINT not ignored. A shell without job control
    starts a background job (`cmd &`) with SIGINT ignored, and Python then leaves it ignored: the
    launcher rightly holds no interrupt then, and a suite started that way failed here."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def deliver(signum: int) -> None:
    """Send ``signum`` to this process, which the launcher's handler must catch (the default ends pytest)."""
    handler = signal.getsignal(signum)
    if handler in (signal.SIG_DFL, None):
        pytest.fail(f"no handler for signal {signum} while the launcher runs")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if signum in blocked:
        pytest.fail(f"signal {signum} is blocked in this thread ({sorted(blocked)}); handler {handler!r}")
    if handler is signal.SIG_IGN:
        pytest.fail(f"signal {signum} is ignored in this process")
    signal.raise_signal(signum)


def stop_at(monkeypatch, step: int, signum: int) -> Callable:
    """Deliver ``signum`` to this process in the forward pass of step ``step`` (1-based); returns
    the function it stands in for."""
    calls = {"n": 0}
    real = train.window_losses

    def losses(model, ids):
        calls["n"] += 1
        if calls["n"] == step:
            deliver(signum)
        return real(model, ids)

    monkeypatch.setattr(train, "window_losses", losses)
    return real


def continue_command(err: str) -> list[str]:
    """The arguments of the command the interrupt message gives, without the script."""
    command = re.search(r": python (.*)$", err.strip()).group(1)
    return shlex.split(command)[1:]


# ----- 1: a save cut short -----
def test_a_save_cut_short_leaves_no_step_dir_and_resume_latest_skips_it(tmp_path, texts, monkeypatch, capsys):
    """SIGTERM twice during the save of step 2 (the second stops the save at once; one waits for it)
    once left an empty step_2/ that --resume latest picked."""
    from accelerate import Accelerator

    real = Accelerator.save_state

    def save_state(self, path, *args, **kwargs):
        if "step_2" in str(path):  # a part written, then the signal
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "model.safetensors").write_bytes(b"half")
            deliver(signal.SIGTERM)
            deliver(signal.SIGTERM)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    monkeypatch.setattr(resume_check, "COPIES_WITHIN_S", 0.0)  # the second signal is not a copy
    out = tmp_path / "run"
    code, err = exits(capsys, texts, out, "--save-every", "1")
    assert code == 143 and "Traceback" not in err
    assert f"the newest complete checkpoint is {out / 'checkpoints' / 'step_1'}" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2.partial"]
    monkeypatch.setattr(Accelerator, "save_state", real)
    (out / "checkpoints" / "step_9").mkdir()  # an empty one, as an older version left
    rows = run(texts, out, "--save-every", "1", "--resume", "latest")
    assert rows[0]["resumed_from"] == str(out / "checkpoints" / "step_1")
    assert [r["step"] for r in rows if "loss" in r] == [2, 3, 4]
    assert "skipping step_9" in capsys.readouterr().err
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_1", "step_2", "step_3", "step_4", "step_9"]  # the .partial is gone
    assert all((out / "checkpoints" / f"step_{s}" / checkpoints.MARKER).is_file() for s in (1, 2, 3, 4))


def test_one_sigterm_during_a_save_waits_for_it(tmp_path, texts, monkeypatch, capsys):
    """The save under way when the signal comes is finished and kept; the run then stops."""
    from accelerate import Accelerator

    real = Accelerator.save_state

    def save_state(self, path, *args, **kwargs):
        if "step_2" in str(path):
            deliver(signal.SIGTERM)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    out = tmp_path / "run"
    code, err = exits(capsys, texts, out, "--save-every", "1")
    assert code == 143 and "Traceback" not in err
    assert "finetune: SIGTERM during the checkpoint of step 2: finishing it first" in err
    assert f"the newest complete checkpoint is {out / 'checkpoints' / 'step_2'}" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2"]


# ----- 2: Ctrl-C and SIGTERM -----
def test_sigterm_says_what_was_kept_and_the_command_that_continues(tmp_path, texts, monkeypatch, capsys):
    out = tmp_path / "run"
    real = stop_at(monkeypatch, 3, signal.SIGTERM)
    code, err = exits(capsys, texts, out, "--save-every", "2")
    assert code == 143 and "Traceback" not in err and "KeyboardInterrupt" not in err
    line = err.strip().splitlines()[-1]
    assert "interrupted by SIGTERM after step 2 of 4" in line
    assert f"the newest complete checkpoint is {out / 'checkpoints' / 'step_2'}; to continue: python " in line
    argv = continue_command(line)
    assert argv[-4:] == ["--output-dir", str(out), "--resume", "latest"]
    monkeypatch.setattr(train, "window_losses", real)
    rows = main(argv)
    assert [r["step"] for r in rows if "loss" in r] == [3, 4]


def test_ctrl_c_before_any_checkpoint_lets_the_same_command_start_again(tmp_path, texts, monkeypatch, capsys):
    """The output dir of a run stopped before its first save was refused for good ('already holds a
    run') and could not be resumed ('no checkpoints/step_N'): the same command now starts again."""
    out = tmp_path / "run"
    real = stop_at(monkeypatch, 2, signal.SIGINT)
    code, err = exits(capsys, texts, out)
    assert code == 130 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "interrupted by SIGINT after step 1 of 4" in line and "there is no complete checkpoint" in line
    assert f"to start again (a fresh run reuses {out}: it holds no checkpoint)" in line
    assert "--resume" not in continue_command(line)
    monkeypatch.setattr(train, "window_losses", real)
    rows = main(continue_command(line))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in log].count("start") == 1  # the stopped run's records are gone


# ----- 3: resume with other settings, or a finished run -----
@pytest.fixture
def finished(tmp_path, texts) -> Path:
    out = tmp_path / "done"
    run(texts, out, "--save-every", "2")
    return out


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--optimizer", "adamw"], '--optimizer (saved "soap", given "adamw")'),
        (["--context", "64"], "--context (saved 32, given 64)"),
        (["--max-precond-dim", "8"], "--max-precond-dim (saved 10000, given 8)"),
        (["--beta2", "0.9"], "--beta2 (saved 0.95, given 0.9; the checkpoint restores it)"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_the_flag(
    finished, texts, flags, named, capsys, monkeypatch
):
    monkeypatch.setattr(train, "prepare", lambda *a: pytest.fail("built the model"))
    code, err = exits(capsys, texts, finished, "--steps", "6", "--resume", "latest", *flags)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"launchers/finetune.py: error: --resume: the checkpoint {finished}/checkpoints/step_4"
    )
    assert named in err and "Pass the saved values to resume it" in err


def test_resuming_a_finished_run_says_nothing_to_train(finished, texts, capsys):
    before = (finished / "metrics.jsonl").read_text()
    assert run(texts, finished, "--resume", "latest") == []
    assert "is at step 4, which is --steps: the run is finished, nothing to train" in capsys.readouterr().out
    assert (finished / "metrics.jsonl").read_text() == before
    code, err = exits(capsys, texts, finished, "--steps", "3", "--resume", "latest")
    assert code == 2 and "--steps 3 is below the step of the checkpoint being resumed" in err


def test_what_resume_compares():
    saved = FinetuneConfig().to_dict()
    assert config_differences(saved, FinetuneConfig(steps=9, lr=1e-4, save_every=3, threads=2)) == []
    assert config_differences(saved, FinetuneConfig(seed=1)) == ["--seed (saved 0, given 1)"]
    adamw = FinetuneConfig(optimizer="adamw", shampoo_beta=0.5)  # SOAP's options mean nothing to AdamW
    assert config_differences(saved, adamw) == ['--optimizer (saved "soap", given "adamw")']
    ddp = {"backend": "ddp", "world": 2, "mixed_precision": "no"}
    assert setup_difference(ddp, {**ddp, "world": 1, "backend": "single"}) == [  # the same files, but the
        # data position is counted in per-process batches: at another world size it would replay windows
        "the Accelerate setup (saved ddp, 2 processes, mixed precision no; now single, 1 process, mixed "
        "precision no): launch with the saved one"
    ]
    assert setup_difference({**ddp, "world": 1}, {**ddp, "world": 1, "backend": "single"}) == []
    zero = {"backend": "deepspeed-zero2", "world": 2, "mixed_precision": "no"}
    assert setup_difference(zero, ddp) and setup_difference(zero, {**zero, "world": 4})


# ----- 4: the Trainer route saves at the end -----
def test_the_trainer_route_saves_at_the_end_by_default_and_says_what_it_writes(tmp_path, texts, capsys):
    from soap_apps.finetune.hf import training_arguments

    cfg = FinetuneConfig(steps=7, output_dir=str(tmp_path / "t"))
    args = training_arguments(cfg, use_cpu=True)
    assert (str(args.save_strategy).split(".")[-1].lower(), args.save_steps) == ("steps", 7)
    assert training_arguments(FinetuneConfig(save_every=3), use_cpu=True).save_steps == 3
    helps = build_parser("launchers/finetune_trainer.py").format_help()
    assert "metrics.jsonl" not in helps and "checkpoint-N" in helps
    trainer_main = finetune_trainer.main
    out = tmp_path / "trainer"
    trainer_main([*TINY, "--steps", "2", "--data", str(texts), "--output-dir", str(out)])
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "checkpoint-2" / checkpoints.MARKER).is_file()
    capsys.readouterr()
    trainer_main(
        [*TINY, "--steps", "2", "--data", str(texts), "--output-dir", str(out), "--resume", "latest"]
    )
    assert "nothing to train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        trainer_main(
            [
                *TINY,
                "--data",
                str(texts),
                "--output-dir",
                str(out),
                "--resume",
                "latest",
                "--optimizer",
                "adamw",
            ]
        )
    assert exc.value.code == 2 and '--optimizer (saved "soap", given "adamw")' in capsys.readouterr().err


# ----- 5: checks that fired late or named the wrong flag -----
@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--shampoo-beta", 5.0, "shampoo_beta must be < 1 (negative: --beta2), got 5.0"),
        ("--precondition-frequency", 0, "precondition_frequency must be >= 1, got 0"),
        ("--max-precond-dim", -1, "max_precond_dim must be >= 0, got -1"),
    ],
)
def test_bad_soap_flags_fail_before_any_work_naming_the_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args([flag, str(value)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    key = flag[2:].replace("-", "_")
    with pytest.raises(ValueError, match=f"SOAP: invalid {key}="):  # what SOAP says, once the model is built
        SOAP([torch.zeros(2, 2, requires_grad=True)], **train.soap_kwargs(FinetuneConfig(**{key: value})))


def test_an_output_dir_that_cannot_be_written_fails_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "make_accelerator", lambda cfg: None)  # must not be needed
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, said in (
        ("/proc/x", "--output-dir /proc/x cannot be created"),
        (str(afile / "run"), f"--output-dir {afile / 'run'} cannot be created: {afile} is a file"),
    ):
        with pytest.raises(SystemExit) as exc:
            train.main(["--output-dir", out])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(f"launchers/finetune.py: error: {said}"), err
        assert err.count("\n") == 1


# ----- 6: --help -----
@pytest.mark.parametrize("prog", ["launchers/finetune.py", "launchers/finetune_trainer.py"])
def test_help_says_each_default_once(prog):
    parser = build_parser(prog)
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._get_help_string(action) or ""
        assert text.count("(default:") <= 1, (action.option_strings, text)
    said = {a.dest: formatter._get_help_string(a) for a in parser._actions}
    for dest in ("data", "mixed_precision", "output_dir"):  # each said "(default: ...) (default: None)"
        assert said[dest].count("(default:") == 1 and "(default: None)" not in said[dest], said[dest]


def test_a_live_runs_output_dir_is_neither_started_over_nor_resumed(tmp_path, texts, capsys):
    """A second job with the same --output-dir took a live run's leftovers for an interrupted run's and
    deleted its metrics; the lock refuses it, and --resume too, naming the holder."""
    from soap_apps import run_lock

    out = tmp_path / "live"
    out.mkdir()
    (out / checkpoints.METRICS).write_text('{"event": "start", "step": 0}\n')  # a run before its first save
    with run_lock.holding(out, True):
        code, err = exits(capsys, texts, out)
        assert code == 2 and "is in use by a run that is still going (pid" in err, err
        code, err = exits(capsys, texts, out, "--resume", "latest")  # refused: no checkpoint yet
        assert code == 2, err
    assert (out / checkpoints.METRICS).read_text() == '{"event": "start", "step": 0}\n'


def test_the_trainer_route_resolves_resume_latest_once(tmp_path, texts, capsys):
    """The newest complete checkpoint-N was looked up twice (before the lock, and for train()), and the
    note on a newer one cut short was printed twice."""
    out = tmp_path / "trainer"
    run = [*TINY, "--data", str(texts), "--output-dir", str(out)]
    finetune_trainer.main([*run, "--steps", "2"])
    (out / "checkpoint-9").mkdir()  # cut short: no trainer_state.json
    capsys.readouterr()
    finetune_trainer.main([*run, "--steps", "3", "--resume", "latest"])
    assert capsys.readouterr().err.count("skipping checkpoint-9") == 1
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()


def test_the_trainer_route_names_checkpoints_whose_save_was_cut_short(tmp_path):
    """Only an incomplete checkpoint-4: --resume latest advised dropping --resume, which was then
    refused for the folder it holds, and --resume DIR took the incomplete one."""
    from soap_apps.finetune.hf import trainer_resume

    (tmp_path / "checkpoint-4").mkdir()  # no trainer_state.json: the Trainer writes it last
    with pytest.raises(FileNotFoundError, match=r"only checkpoint-4, whose save was cut short\): delete"):
        trainer_resume(FinetuneConfig(resume="latest"), tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint"):
        trainer_resume(FinetuneConfig(resume=str(tmp_path / "checkpoint-4")), tmp_path)


def test_the_trainer_route_takes_the_run_directory_lock(tmp_path, texts, capsys):
    """Two Trainer jobs started together with one --output-dir both wrote the same checkpoint-N."""
    from soap_apps import run_lock

    out = tmp_path / "held"
    with run_lock.holding(out, True), pytest.raises(SystemExit) as exc:
        finetune_trainer.main([*TINY, "--steps", "2", "--data", str(texts), "--output-dir", str(out)])
    assert exc.value.code == 2 and "is in use by a run that is still going" in capsys.readouterr().err
    assert not any(p.name.startswith("checkpoint-") for p in out.iterdir())
