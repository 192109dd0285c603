"""The benchmark tools refuse a bad flag at once: argparse's one line ``error: argument --x: ...`` naming
the flag and the values it takes, exit 2, before any parameter is built or any rank spawned (these were
tracebacks, or failures after minutes of measuring, or silent nonsense with rc 0). Parsing only: the
functions that start the work are replaced by one that fails the test, so nothing is measured.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from soap_dist.bench import __main__ as bench
from soap_dist.bench import cli, float32_sensitivity, owner_traffic, qr_accuracy, refresh_parts, scaling

REPO = Path(__file__).resolve().parents[1]
# per tool, the functions that start its work: none may run for a refused command line
WORK = {
    bench: ("gpt2_specs", "run_round"),
    scaling: ("scaled_specs", "run_world"),
    owner_traffic: ("table",),
    float32_sensitivity: ("scaled_specs", "run"),
    qr_accuracy: ("problem",),
    refresh_parts: ("factor_sizes", "measure"),
}
NO_CUDA = "cuda" if not torch.cuda.is_available() else "cuda:99"


def _no_work(*args: object, **kwargs: object) -> None:
    raise AssertionError("the benchmark started working on a command line it should have refused")


def refusal(module: ModuleType, argv: list[str], monkeypatch, capsys) -> str:
    """The error line that ``module.main(argv)`` exits with (code 2), checked to start no work."""
    for name in WORK[module]:
        monkeypatch.setattr(module, name, _no_work)
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


CASES = [
    (bench, ["--soap-kw", "block_size=-5"], "argument --soap-kw: SOAP: invalid block_size=-5; expected None"),
    (bench, ["--only", "floor", "--soap-kw", "lr=1"], "argument --soap-kw: 'lr=1': the benchmark sets lr"),
    (bench, ["--soap-kw", "qr_method='x'"], "argument --soap-kw: SOAP: invalid qr_method='x'"),
    (
        bench,
        ["--soap-kw", "placement='owner'"],
        "argument --soap-kw: placement='owner' needs a process group",
    ),
    (bench, ["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got '-1'"),
    (bench, ["--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (bench, ["--threads", "-1"], "argument --threads: expected an integer >= 1"),
    (bench, ["--json", "."], "argument --json: . is a directory; give a file path"),
    (
        bench,
        ["--json", "/nonexist/x.json"],
        "argument --json: /nonexist/x.json: the folder /nonexist does not",
    ),
    (bench, ["--layers", "-2"], "argument --layers: expected an integer >= 1, got '-2'"),
    (bench, ["--layers", "0"], "argument --layers: expected an integer >= 1, got '0'"),
    (bench, ["--max-precond-dim", "-1"], "argument --max-precond-dim: expected an integer >= 0"),
    (bench, ["--only", ","], "argument --only: no name in ','; choose one or more of floor,adamw,plain"),
    (bench, ["--only", "floor,x"], "argument --only: unknown 'x'; choose one or more of floor,adamw"),
    (bench, ["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (bench, ["--rounds", "x"], "argument --rounds: expected an integer >= 1, got 'x'"),
    (bench, ["--device", NO_CUDA], f"argument --device: {NO_CUDA}: "),
    (bench, ["--device", "meta"], "argument --device: 'meta': the benchmarks time cpu or cuda[:N] only"),
    (float32_sensitivity, ["--model", "nope"], "argument --model: invalid choice: 'nope' (choose from"),
    (float32_sensitivity, ["-k", "0"], "argument -k: expected an integer >= 1, got '0'"),
    (float32_sensitivity, ["--width", "-5"], "argument --width: expected an integer >= 0, got '-5'"),
    (owner_traffic, ["--model", "nope"], "argument --model: invalid choice: 'nope'"),
    (owner_traffic, ["--worlds", "2,x"], "argument --worlds: expected a comma list of integers >= 1"),
    (owner_traffic, ["--worlds", "0"], "argument --worlds: expected a comma list of integers >= 1"),
    (owner_traffic, ["-k", "0"], "argument -k: expected an integer >= 1, got '0'"),
    (qr_accuracy, ["--size", "0"], "argument --size: expected an integer >= 1, got '0'"),
    (qr_accuracy, ["--batch", "0"], "argument --batch: expected an integer >= 1, got '0'"),
    (qr_accuracy, ["--iterations", "0"], "argument --iterations: expected an integer >= 1, got '0'"),
    (refresh_parts, ["--sizes", "abc"], "argument --sizes: expected a comma list of integers >= 1"),
    (refresh_parts, ["--sizes", "0"], "argument --sizes: expected a comma list of integers >= 1"),
    (refresh_parts, ["--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    (refresh_parts, ["--device", NO_CUDA], f"argument --device: {NO_CUDA}: "),
    (refresh_parts, ["--json", "/nonexist/x.json"], "argument --json: /nonexist/x.json: the folder"),
    (scaling, ["--worlds", "1,x"], "argument --worlds: expected a comma list of integers >= 1, e.g. 1,2,4"),
    (scaling, ["--delays", "a"], "argument --delays: expected a comma list of integers >= 0, e.g. 0,1"),
    (scaling, ["--delays", "5"], "argument --delays: every delay must be in [0, k) with --k 5, got [5]"),
    (scaling, ["--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (scaling, ["--block-size", "0"], "argument --block-size: expected an integer >= 1, got '0'"),
    (scaling, ["--json", "/nonexist/x.json"], "argument --json: /nonexist/x.json: the folder /nonexist"),
    (scaling, ["--k", "2", "--steps", "4", "--warmup", "10"], "argument --warmup: must be below --steps (4)"),
    (scaling, ["--steps", "2"], "argument --steps: must be >= --k (5) so that a refresh happens, got 2"),
    (scaling, ["--placement", ","], "argument --placement: no name in ','; choose one or more of replicated"),
    (scaling, ["--vocab", "100"], "argument --vocab: 100 <= --max-precond-dim 10000 would give"),
]


@pytest.mark.parametrize(("module", "argv", "message"), CASES, ids=[f"{m.__name__}{a}" for m, a, _ in CASES])
def test_a_bad_flag_is_refused_at_once_naming_it(module, argv, message, monkeypatch, capsys):
    line = refusal(module, argv, monkeypatch, capsys)
    assert line.startswith(f"python -m {module.__name__.removesuffix('.__main__')}: error: argument "), line
    assert message in line, line


def test_the_checks_accept_what_the_tools_take(monkeypatch, tmp_path):
    """max_precond_dim=0 is SOAP's "no factors", warmup 0 and a writable file are fine; lists parse."""
    args = bench.parse_args(["--max-precond-dim", "0", "--warmup", "0", "--json", str(tmp_path / "b.json")])
    assert (args.max_precond_dim, args.warmup, args.only) == (0, 0, list(bench.ORDER))
    args = bench.parse_args(
        ["--only", "floor, plain", "--soap-kw", "block_size=64", "--soap-kw", "placement='single'"]
    )
    assert args.only == ["floor", "plain"] and bench.soap_kwargs(args.soap_kw)["block_size"] == 64
    args = scaling.parse_args(["--worlds", "1, 2", "--delays", "0", "--placement", "owner", "--warmup", "9"])
    assert (args.worlds, args.delays, args.placements, args.placement) == ([1, 2], [0], ["owner"], "owner")
    monkeypatch.setattr(owner_traffic, "table", lambda model, layers, worlds, k: f"{worlds} {k}")
    owner_traffic.main(["--worlds", "2,4", "-k", "3"])


def test_the_shared_types_name_the_allowed_values(tmp_path):
    assert cli.at_least(0)("0") == 0 and cli.int_list(1, "1,2")(" 1, 2,") == [1, 2]
    assert cli.name_list(("a", "b"))("b,a") == ["b", "a"] and cli.torch_device("cpu") == "cpu"
    assert cli.writable_file(str(tmp_path / "x.json")) == str(tmp_path / "x.json")
    for parse, text, message in [
        (cli.at_least(1), "1.5", "expected an integer >= 1, got '1.5'"),
        (cli.int_list(0, "0,1"), "", "expected a comma list of integers >= 0, e.g. 0,1; got ''"),
        (cli.name_list(("a", "b")), "c", "unknown 'c'; choose one or more of a,b"),
        (cli.writable_file, str(tmp_path), "is a directory"),
        (cli.torch_device, "bogus", "'bogus' is not a torch device"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(text)


def test_help_shows_the_defaults_and_every_tool_its_name(capsys):
    """bench's -k (--precondition-frequency), --max-precond-dim, --model and --threads showed no default;
    qr_accuracy's help had no program name and no text on any flag."""
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in (
        "refresh every k steps (default: 10)",
        "gets no factor, so 0 gives none (default: 10000)",
        "parameter set (default: gpt2-small)",
        "torch threads (default: ",
    ):
        assert part in text, text
    with pytest.raises(SystemExit):
        qr_accuracy.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m soap_dist.bench.qr_accuracy")
    for part in ("factor size d (default: 128)", "(default: 2)", "(default: 60)"):
        assert part in text, text


def test_the_launcher_refuses_the_same_way():
    """launchers/bench_step.py is the bench's main(): the same one line, before any work."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "bench_step.py"), "--threads", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: argument --threads: expected an integer >= 1, got '0'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("text", "made_current"), [("cuda", []), ("cuda:1", ["cuda:1"]), ("cpu", [])])
def test_only_an_indexed_cuda_device_is_made_current(text, made_current, monkeypatch):
    """torch.cuda.set_device refuses a bare "cuda" (no index), the benches' default on a GPU: calling
    it there stopped both benches, and the GPU suite's parts a and r, at start."""
    with pytest.raises(ValueError, match="index"):  # torch's own check, before any CUDA call
        torch.cuda.set_device(torch.device("cuda"))
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(str(device)))
    cli.make_current(torch.device(text))
    assert calls == made_current
