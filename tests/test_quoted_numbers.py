"""launchers/quoted_numbers.py's guards: --force deletes only a directory the tool made, and bad
arguments are refused before any run starts (no run is made here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "launchers" / "quoted_numbers.py"


@pytest.fixture(scope="module")
def qn():
    spec = importlib.util.spec_from_file_location("quoted_numbers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_force_deletes_only_a_directory_the_tool_made(qn, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not made by this tool"):
        qn.prepare_runs(mine, force=True)  # it deleted the directory, whatever it held
    assert (mine / "notes.txt").read_text() == "keep"
    runs = tmp_path / "runs"
    qn.prepare_runs(runs, force=False)
    (runs / "soap").mkdir()
    with pytest.raises(SystemExit, match="already holds runs"):
        qn.prepare_runs(runs, force=False)
    qn.prepare_runs(runs, force=True)
    assert sorted(p.name for p in runs.iterdir()) == [qn.MARKER]


def test_the_repository_and_files_are_refused_as_runs(qn, tmp_path):
    with pytest.raises(SystemExit, match="holds the repository"):
        qn.prepare_runs(qn.ROOT, force=True)
    with pytest.raises(SystemExit, match="holds the repository"):
        qn.prepare_runs(qn.ROOT.parent, force=True)
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit, match="is a file"):
        qn.prepare_runs(tmp_path / "f", force=True)


@pytest.mark.parametrize("argv", [["--adamw-lrs", "abc"], ["--adamw-lrs", "1e-3,-1"], ["--nproc", "0"]])
def test_bad_arguments_are_refused_before_any_run(qn, argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        qn.main([*argv, "--runs", str(tmp_path / "runs")])
    assert exit_.value.code == 2
    assert "error: argument" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_relative_paths_are_taken_from_the_current_directory(qn, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qn, "git", lambda *args: "")
    made = []

    def run_one(name, args, nproc, log_dir):
        made.append(log_dir)
        return {"name": name, "command": "", "steps": 1, "train": 2.0, "eval": 2.1, "evals": {}}

    monkeypatch.setattr(qn, "run_one", run_one)
    monkeypatch.setattr(qn, "report", lambda *args: "report\n")
    assert qn.main(["--runs", "rel", "--adamw-lrs", "", "--results", "out.md"]) == 0
    assert made == [tmp_path / "rel"] and (tmp_path / "rel" / qn.MARKER).exists()
    assert (tmp_path / "out.md").read_text() == "report\n"
