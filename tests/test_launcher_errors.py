"""The launchers' answers to bad input and to a diverging run: one line that names the problem and
the way out, a non-zero exit, and no traceback (launchers/pretrain.py, finetune.py,
finetune_trainer.py, compare_runs.py, gpu_suite.py). Everything runs in this process and takes
seconds; the one training run is tiny.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from pretrain_helpers import LAUNCHER, SMALL_MODEL, TINY, temporary_cache

from soap_apps.config_loader import ConfigError, parse_override, read_mapping
from soap_apps.pretrain.config import load_config
from soap_apps.pretrain.model import load_exported
from soap_apps.pretrain.trainer import NonFiniteLoss, run

pytestmark = pytest.mark.filterwarnings("ignore")

SMALL = [*SMALL_MODEL, "data.eval_fraction=0.1"]  # as in tests/test_pretrain_launcher.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    yield from temporary_cache(tmp_path_factory)


def _launcher(name: str):
    sys.path.insert(0, str(LAUNCHER.parent))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _sets(*overrides: str) -> list[str]:
    return [arg for o in (*SMALL, *overrides) for arg in ("--set", o)]


# ----- pre-training: a diverging run -----
def test_pretrain_stops_at_the_first_non_finite_loss(tmp_path, texts, cache, one_process, capsys):
    """lr 1e9: the loss is NaN from step 3. The run stops at the next check (step 4: a checkpoint is
    due), says where and why, exits 1, keeps the step-2 checkpoint and exports nothing."""
    out = tmp_path / "run"
    argv = [*_sets("train.steps=10", "train.log_every=5", "train.checkpoint_every=2", "optim.lr=1e9")]
    assert _launcher("pretrain").main([*argv, "--data", str(texts), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = re.search(r"pretrain: error: (.*)", err).group(1)
    assert message.startswith("the training loss is nan at step 3 (found at step 4); stopped, and no model")
    assert f"the last checkpoint, from before it, is {out / 'checkpoints' / 'step_2'}" in message
    assert "Lower optim.lr (now 1e+09) or check the data" in message
    assert not (out / "final").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]  # no NaN checkpoint

    cfg = load_config(TINY, [*SMALL, "train.steps=3", "optim.lr=1e9", f"data.path={texts}"])
    with pytest.raises(NonFiniteLoss, match=r"nan at step 3; .* no checkpoint was written before it"):
        run(cfg, run_dir=tmp_path / "direct")  # the last step: checked before the export
    assert not (tmp_path / "direct" / "final").exists()


def test_resume_without_a_checkpoint_warns(tmp_path, texts, cache, one_process, capsys):
    cfg = load_config(TINY, [*SMALL, "train.steps=1", f"data.path={texts}"])
    result = run(cfg, run_dir=tmp_path / "new", resume=True)
    assert result.step == 1 and result.exported is not None  # otherwise a new run, as before
    warning = f"pretrain: warning: --resume: no checkpoint under {tmp_path / 'new'}; starting a new run"
    assert warning in capsys.readouterr().err


# ----- pre-training: --config, --set and --out -----
@pytest.mark.parametrize(
    "text, problem",
    [
        (
            "train:\n  steps: [1, 2\n",
            "at line 3, column 1 (while parsing a flow sequence at line 2: '  steps: [1, 2')",
        ),
        ("a: b: c\n", "mapping values are not allowed here at line 1, column 5: 'a: b: c'"),
        ("x:\n\t- 1\n", "found character '\\t' that cannot start any token at line 2, column 1: '\\t- 1'"),
    ],
)
def test_a_config_that_is_not_yaml_names_the_file_and_the_line(tmp_path, text, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as exc:
        read_mapping(bad, examples="configs/x/", top="keys")
    message = str(exc.value)
    assert message.startswith(f"config file '{bad}' is not valid YAML: ") and problem in message, message


def test_config_and_override_errors_reach_the_launcher_as_one_line(tmp_path, capsys):
    launcher = _launcher("pretrain")
    binary = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, binary)
    for argv, message in (
        (["--config", str(LAUNCHER)], "is not valid YAML: expected '<document start>'"),
        (["--config", str(binary)], f"config file '{binary}' is not a YAML file: byte"),
        (["--config", str(tmp_path)], "is a directory; give a YAML file"),
        (["--set", "train.steps=[1"], "the override 'train.steps=[1': its value '[1' is not valid YAML"),
    ):
        assert launcher.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err, err
    with pytest.raises(ConfigError, match=r"override 'steps=a: b: c': its value 'a: b: c' is not valid"):
        parse_override("steps=a: b: c", "key=value", "steps=20")


def test_a_bad_out_is_refused_before_anything_happens(tmp_path, one_process, capsys, monkeypatch):
    from soap_apps.pretrain import trainer

    monkeypatch.setattr(trainer.parallel, "init_distributed", lambda: pytest.fail("started"))
    launcher = _launcher("pretrain")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in (
        (afile, f"--out {afile} exists and is not a directory; pass --out a new or empty directory"),
        (afile / "run", f"--out {afile / 'run'} cannot be created: {afile} is a file, not a directory"),
    ):
        assert launcher.main(["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"launchers/pretrain.py: error: {message}\n"
    assert afile.read_text() == "x"


# ----- fine-tuning -----
def test_load_exported_names_the_path_it_was_given(tmp_path):
    nope = re.escape(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=rf"load_exported: {nope} does not exist; pass the final/"):
        load_exported(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path / 'model.pt'))} is missing"):
        load_exported(tmp_path)  # a directory without an export: its model.pt is what is missing


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--init-from", "/nonexistent"], "--init-from '/nonexistent' does not exist; give the final/"),
        (["--data", "/nodata"], "--data '/nodata' does not exist; give a text file or a directory of them"),
        (["--resume", "/nope"], "--resume '/nope' is not a directory written by save_state"),
        (["--resume", "latest"], "--resume latest: no checkpoints/step_N under --output-dir '"),
    ],
)
def test_finetune_missing_paths_exit_2_in_one_line(tmp_path, flags, message, capsys, monkeypatch):
    from soap_apps.finetune import train

    # the paths are checked before the Accelerator is used: a stand-in that must not be touched
    monkeypatch.setattr(train, "make_accelerator", lambda cfg: None)
    with pytest.raises(SystemExit) as exc:
        train.main([*flags, "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"launchers/finetune.py: error: {message}") and err.count("\n") == 1, err


def test_finetune_too_little_data_is_a_config_error(tmp_path):
    from soap_apps.finetune.data import load_bytes

    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"holds only 2 bytes"):
        load_bytes(str(tmp_path), 1000)


def _export(directory: Path, **model: int) -> Path:
    """A tiny pre-training export (launchers/pretrain.py's final/) in ``directory``."""
    from soap_apps.pretrain.config import ModelConfig
    from soap_apps.pretrain.model import GPT, export

    cfg = ModelConfig(**{"d_model": 16, "n_layers": 1, "n_heads": 2, **model})
    return export(GPT(cfg).state_dict(), cfg, directory)


def test_finetune_export_mismatch_names_the_flag_and_the_fix(tmp_path, texts, capsys, monkeypatch):
    from types import SimpleNamespace

    from soap_apps.finetune import train
    from soap_apps.finetune.model import load_export

    short = str(_export(tmp_path / "short", seq_len=32))
    with pytest.raises(ConfigError) as exc:
        load_export(short, 64)
    assert str(exc.value) == (
        f"--context=64 exceeds the exported model's context of 32 (--init-from {short!r}); "
        "pass --context 32 or less"
    )
    assert load_export(short, 32) is not None
    tokens = str(_export(tmp_path / "tokens", vocab_size=100, seq_len=32))
    with pytest.raises(ConfigError) as exc:
        load_export(tokens, 32)
    assert str(exc.value).startswith(
        f"--init-from {tokens!r}: the exported model's vocab_size=100 is smaller than the 256 byte values "
        "fine-tuning feeds it; pass --init-from the final/ directory of a byte-level pre-training run"
    )
    # what the user sees: one line, exit 2 (a stand-in Accelerator: no training starts)
    accelerator = SimpleNamespace(wait_for_everyone=lambda: None, num_processes=1, is_main_process=True)
    monkeypatch.setattr(train, "make_accelerator", lambda cfg: accelerator)
    monkeypatch.setattr(train, "make_optimizer", lambda cfg, model: pytest.fail("got past the model"))
    argv = ["--init-from", short, "--data", str(texts), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        train.main([*argv, "--context", "64", "--max-bytes", "4000"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("launchers/finetune.py: error: --context=64 exceeds") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "/nodata"], "--data '/nodata' does not exist; give a text file or a directory of them"),
        (["--init-from", "/nonexistent"], "--init-from is not supported by the Trainer route"),
        (["--resume", "/nope"], "--resume '/nope' is not a directory; give a checkpoint-N directory"),
        (["--resume", "latest"], "--resume latest: no complete checkpoint-N under --output-dir '"),
        (["--output-dir", "USED"], "--output-dir 'USED' already holds a run (metrics.jsonl); pass --resume"),
    ],
)
def test_finetune_trainer_bad_inputs_exit_2_in_one_line(
    tmp_path, flags, message, capsys, monkeypatch, one_process
):
    """The HF Trainer route checks what launchers/finetune.py checks, before the model or the data."""
    from soap_apps.finetune import hf

    for heavy in ("build_gpt2", "load_bytes", "shared_schedule_trainer"):
        monkeypatch.setattr(hf, heavy, lambda *a, **k: pytest.fail("started building"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "USED").mkdir()
    (tmp_path / "USED" / "metrics.jsonl").write_text("{}\n")
    out = [] if "--output-dir" in flags else ["--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        _launcher("finetune_trainer").main([*flags, *out])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"launchers/finetune_trainer.py: error: {message}") and err.count("\n") == 1, err


def test_finetune_trainer_resume_finds_the_trainers_checkpoints(tmp_path):
    from soap_apps.finetune.config import FinetuneConfig
    from soap_apps.finetune.hf import trainer_resume
    from soap_apps.finetune.train import check_inputs

    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12", "step_30"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-2", "checkpoint-10"):  # complete: the Trainer writes trainer_state.json last
        (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-99").write_text("not a directory")
    latest = FinetuneConfig(resume="latest")
    assert trainer_resume(latest, tmp_path) == tmp_path / "checkpoint-10"  # checkpoint-12 was cut short
    assert check_inputs(latest, lambda c: trainer_resume(c, tmp_path)) == tmp_path / "checkpoint-10"
    given = FinetuneConfig(resume=str(tmp_path / "checkpoint-2"))
    assert trainer_resume(given, tmp_path / "elsewhere") == tmp_path / "checkpoint-2"
    assert trainer_resume(FinetuneConfig(), tmp_path) is None


# ----- compare_runs.py -----
def test_compare_runs_bad_run_dirs_and_names_exit_2(tmp_path, capsys):
    compare_runs = _launcher("compare_runs")
    (tmp_path / "empty").mkdir()
    for argv, message in (
        ([str(tmp_path / "missing")], f"{tmp_path / 'missing' / 'metrics.jsonl'}: no training records"),
        ([str(tmp_path / "empty")], "is " + str(tmp_path / "empty") + " a finished pretrain run directory?"),
        ([str(tmp_path / "empty"), "--names", "a", "b"], "--names has 2 entries for 1 run directories"),
    ):
        with pytest.raises(SystemExit) as exc:
            compare_runs.main([*argv, "--out", str(tmp_path / "x.png")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "launchers/compare_runs.py: error: " in err and message in err, err
    assert not (tmp_path / "x.png").exists()


# ----- gpu_suite.py -----
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--parts", "xyz"], "--parts must be some of the letters r, a, b, c, each at most once; got 'xyz'"),
        (["--parts", "xyz"], "(unknown 'x', 'y', 'z')"),
        (["--parts", "rbx"], "got 'rbx' (unknown 'x')"),
        (["--parts", "abca"], "got 'abca' (repeated)"),
        (["--parts", ""], "got '' (empty)"),
        (["--budget", "-5"], "--budget must be a number of seconds > 0, got -5"),
        (["--budget", "0"], "--budget must be a number of seconds > 0, got 0"),
        (["--budget", "nan"], "--budget must be a number of seconds > 0, got nan"),
    ],
)
def test_gpu_suite_refuses_bad_parts_and_budgets(tmp_path, flags, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # never starts the suite
    with pytest.raises(SystemExit) as exc:
        _launcher("gpu_suite").main(["--out", str(tmp_path / "out"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpu_suite_accepts_parts_in_any_order_and_describes_them(tmp_path, capsys, monkeypatch):
    gpu_suite = _launcher("gpu_suite")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):  # past the checks of --parts and --budget: the missing GPU
        gpu_suite.main(["--out", str(tmp_path / "out"), "--parts", "cb", "--budget", "30"])
    assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_suite.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for part in (
        "r = where a refresh's time goes",
        "a = the step benchmark",
        "b = a gpt2-small training loop",
        "c = the race, SOAP against AdamW",
    ):
        assert part in help_text, help_text


# ----- python -m soap_dist.bench -----
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--soap-kw", "block_size"], "argument --soap-kw: 'block_size': expected KEY=VALUE"),
        (
            ["--soap-kw", "blok_size=3"],
            "argument --soap-kw: 'blok_size=3': soap_dist.SOAP has no argument 'blok_size'",
        ),
        (["--soap-kw", "block_size=abc"], "'abc' is not a Python literal"),
        (
            ["--soap-kw", "precondition_frequency=3"],
            "sets precondition_frequency itself; use --precondition-f",
        ),
        (
            ["--json", "/nonexistent/x.json"],
            "argument --json: /nonexistent/x.json: the folder /nonexistent does not exist",
        ),
        (["--device", "bogus"], "argument --device: 'bogus' is not a torch device"),
    ],
)
def test_bench_refuses_bad_flags_before_any_setup(flags, message, capsys, monkeypatch):
    """These used to be a SyntaxError, a TypeError after the setup, or a failure after the whole run."""
    from soap_dist.bench import __main__ as bench

    monkeypatch.setattr(bench, "gpt2_specs", None)  # nothing may be built
    with pytest.raises(SystemExit) as exc:
        bench.main(["--layers", "1", "--steps", "1", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
        assert "argument --device: cuda: this torch has no usable CUDA" in capsys.readouterr().err
    assert bench.soap_kwargs(["block_size=8", "factor_dtype=torch.float64"]) == {
        "block_size": 8,
        "factor_dtype": torch.float64,
    }


def test_a_cache_dir_that_cannot_be_written_is_a_config_error_naming_it(tmp_path, texts):
    """It was a PermissionError (or NotADirectoryError) traceback from deep in the data preparation."""
    from soap_apps.pretrain import data
    from soap_apps.pretrain.config import DataConfig

    (tmp_path / "afile").write_text("")
    bad = str(tmp_path / "afile" / "cache")  # not writable even by root: its parent is a file
    with pytest.raises(ConfigError, match=rf"data.cache_dir='{re.escape(bad)}': cannot write the prepared"):
        data.prepare_tokens(DataConfig(path=str(texts), cache_dir=bad), writer=True, barrier=lambda: None)
