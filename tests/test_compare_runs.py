"""launchers/compare_runs.py: the SOAP-vs-AdamW table and plot from finished runs' metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest

from soap_apps.pretrain.compare import compare, summarize


def _run(tmp_path, name, losses, speeds, evals):
    d = tmp_path / name
    d.mkdir()
    lines = [
        {"step": 10 * (i + 1), "loss": v, "lr": 1e-3, "grad_norm": 1.0, "tokens": 1000 * (i + 1),
         "tokens_per_s": s, "elapsed_s": float(i)}
        for i, (v, s) in enumerate(zip(losses, speeds, strict=True))
    ]  # fmt: skip
    lines += [{"step": st, "eval_loss": e} for st, e in evals]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(d)


def test_table_and_plot(tmp_path):
    soap = _run(tmp_path, "soap", [3.0, 2.0, 1.5], [90.0, 100.0, 110.0], [(30, 1.6), (30, 1.6)])
    adamw = _run(tmp_path, "adamw", [3.0, 2.5, 2.2], [200.0, 190.0, 210.0], [(30, 2.3)])
    out = tmp_path / "cmp.png"
    result = compare([soap, adamw], str(out), ["SOAP", "AdamW"])
    rows = result["table"].splitlines()
    assert rows[2] == "| SOAP | 30 | 3,000 | 1.5000 | 1.6000 | 100 | 1.00x |"
    assert rows[3] == "| AdamW | 30 | 3,000 | 2.2000 | 2.3000 | 200 | 2.00x |"
    assert out.stat().st_size > 1000
    assert summarize(soap).evals == [(30, 1.6)]  # a duplicated final eval counts once


def test_missing_run_and_bad_names_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="finished pretrain run directory"):
        summarize(tmp_path)
    run = _run(tmp_path, "a", [1.0], [1.0], [])
    with pytest.raises(ValueError, match="--names has 2 entries for 1 run"):
        compare([run], str(tmp_path / "x.png"), ["a", "b"])


def _png_text(path) -> dict:
    from PIL import Image

    with Image.open(path) as image:
        return dict(image.text)


def test_plot_against_steps_or_wall_clock(tmp_path):
    """Issue 13: compare_runs plots against elapsed_s (--x time) or steps as well as tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launchers"))
    try:
        import compare_runs
    finally:
        sys.path.pop(0)
    soap = _run(tmp_path, "soap", [3.0, 2.0, 1.5], [90.0, 100.0, 110.0], [(20, 1.9), (30, 1.6)])
    adamw = _run(tmp_path, "adamw", [3.0, 2.5, 2.2], [200.0, 190.0, 210.0], [(30, 2.3)])
    (tmp_path / "adamw" / "config.yaml").write_text("data:\n  path: /data/owt/train.bin\n")
    for x, axis in (("time", "seconds in the training loop (elapsed_s)"), ("step", "optimizer step")):
        out = tmp_path / f"{x}.png"
        compare_runs.main([soap, adamw, "--x", x, "--out", str(out), "--title", "tiny"])
        assert _png_text(out) == {"Title": "tiny", "Description": f"loss against {axis}", "Software": ANY}
    run = summarize(soap)
    assert run.elapsed == [0.0, 1.0, 2.0] and run.seconds_at(25) == 1.5  # evaluations: interpolated
    assert run.unit == "nats/byte" and summarize(adamw).unit == "nats/token"  # a .bin holds token ids
    with pytest.raises(ValueError, match="--x must be one of tokens, step, time, got 'bytes'"):
        compare([soap], str(tmp_path / "x.png"), x="bytes")


def test_a_cut_last_line_is_dropped_with_a_warning_and_a_bad_line_elsewhere_named(tmp_path, capsys):
    """A kill mid-write leaves a cut last line: read without it (and a warning); any other bad line
    is an error naming the file and the line."""
    from soap_apps.config_loader import ConfigError
    from soap_apps.jsonl import read_records

    run = Path(_run(tmp_path, "cut", [3.0, 2.0], [1.0, 1.0], []))
    path = run / "metrics.jsonl"
    with path.open("a") as fh:
        fh.write('{"step": 30, "loss": 1.')
    assert [r["step"] for r in read_records(path)] == [10, 20]
    assert f"warning: {path} line 3 is cut off" in capsys.readouterr().err
    assert summarize(run).steps == 20
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match=f"{path} line 2 is not a JSON object"):
        read_records(path)


def test_out_with_a_suffix_matplotlib_cannot_write_is_refused_up_front(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launchers"))
    try:
        import compare_runs
    finally:
        sys.path.pop(0)
    run = _run(tmp_path, "a", [1.0], [1.0], [])
    for out in ("x.txt", "x"):
        with pytest.raises(SystemExit) as exc:
            compare_runs.main([run, "--out", str(tmp_path / out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"--out {tmp_path / out}: the plot is written by matplotlib, which cannot write" in err
        assert "end the name in .png, .pdf or .svg" in err and "Traceback" not in err


def test_a_stopped_run_is_marked_and_warned(tmp_path):
    """A run interrupted at step 30 of 300 was listed like a finished one, its losses beside others' ends."""
    soap = _run(tmp_path, "soap", [3.0, 2.0, 1.5], [90.0, 100.0, 110.0], [])
    (Path(soap) / "config.yaml").write_text("train:\n  steps: 300\n")
    done = _run(tmp_path, "done", [3.0, 2.0, 1.5], [90.0, 100.0, 110.0], [])
    (Path(done) / "config.yaml").write_text("train:\n  steps: 30\n")
    result = compare([soap, done], str(tmp_path / "c.png"))
    assert result["table"].splitlines()[2].startswith("| soap | 30 of 300 (stopped) |")
    assert result["table"].splitlines()[3].startswith("| done | 30 |")
    assert len(result["warnings"]) == 1 and "soap stopped at step 30 of its 300" in result["warnings"][0]


def test_a_fine_tuning_run_or_a_binary_file_is_named(tmp_path):
    run = tmp_path / "ft"
    run.mkdir()
    record = {"step": 1, "loss": 5.0, "tokens": 1024, "step_s": 6.0}  # the fine-tuning launcher's
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="not a pre-training run's metrics"):
        summarize(run)  # a KeyError: 'tokens_per_s' before
    (run / "metrics.jsonl").write_bytes(b"\x00\xd0\xff binary")
    with pytest.raises(ValueError, match=r"metrics.jsonl is not a text file"):
        summarize(run)  # a UnicodeDecodeError that named no file before
