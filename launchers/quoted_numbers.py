"""Re-measure the losses README.md and docs/pretrain.md quote for the main job, and write them down.

    python launchers/quoted_numbers.py                    # SOAP + AdamW at 3 lrs: ~10 min on 2 cores
    python launchers/quoted_numbers.py --adamw-lrs 3e-3   # SOAP + one AdamW run
    python launchers/quoted_numbers.py --adamw-lrs ''     # SOAP only

Every run is the README's main job: tiny-cpu as shipped, ``torchrun --standalone --nproc_per_node=2
launchers/pretrain.py`` (FSDP2 over 2 processes, global batch 32 x 128 bytes, 300 steps, the same
data order). The AdamW runs are the same command with ``--optimizer adamw --set optim.betas=[0.9,0.95]
--set optim.lr=LR``: same global batch, steps, data, schedule, weight decay and clipping; only the
update rule, its betas and its peak lr differ. The results file (default
docs/bench_results/main_job.md) holds the git commit and whether the tree was dirty, each command, and
each run's final train loss (mean of the last 10 steps, as the launcher prints it) and held-out loss
at every evaluation. Runs go one after another (each takes both cores) into ``--runs`` (default
``runs/quoted-numbers`` in the repository; a directory that already holds runs is refused unless
``--force``, which deletes only a directory this tool made: it leaves a marker file there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DONE = re.compile(r"pretrain: done at step (\d+): train loss ([0-9.]+), eval loss ([0-9.]+)")
ADAMW_BETAS = "[0.9,0.95]"
MARKER = ".quoted-numbers-runs"  # in every --runs directory this tool made: --force may delete those only
HEARTBEAT_S = 30.0


def git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"quoted_numbers: 'git {' '.join(args)}' failed in {ROOT}: {error}")
    return out.stdout.strip()


def prepare_runs(runs: Path, force: bool) -> None:
    """An empty or new directory, or (with ``force``) one this tool made, emptied: never anything else,
    since --force deletes it."""
    if runs.exists() and not runs.is_dir():
        sys.exit(f"quoted_numbers: --runs {runs} is a file; give a directory")
    if runs == ROOT or runs in ROOT.parents:
        sys.exit(f"quoted_numbers: --runs {runs} holds the repository; give a directory of its own")
    if runs.exists() and any(runs.iterdir()):
        if not force:
            sys.exit(f"quoted_numbers: {runs} already holds runs; pass --force to replace them, or --runs")
        if not (runs / MARKER).exists():
            sys.exit(
                f"quoted_numbers: {runs} is not empty and was not made by this tool (no {MARKER} in it): "
                "--force deletes only such directories; give another --runs or empty it yourself"
            )
        shutil.rmtree(runs)
    runs.mkdir(parents=True, exist_ok=True)
    (runs / MARKER).write_text("made by launchers/quoted_numbers.py; --force may delete this directory\n")


def learning_rates(text: str) -> list[str]:
    """The --adamw-lrs list, each a number > 0 (checked before any run starts)."""
    lrs = [lr.strip() for lr in text.split(",") if lr.strip()]
    for lr in lrs:
        try:
            ok = float(lr) > 0
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"{lr!r} is not a learning rate > 0 (give e.g. 1e-3,3e-3)")
    return lrs


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def wait_showing_progress(proc: subprocess.Popen, name: str, stdout: Path) -> None:
    """Wait for a run, saying every HEARTBEAT_S seconds that it goes on and where (its last line)."""
    start = time.perf_counter()
    while True:
        try:
            proc.wait(timeout=HEARTBEAT_S)
            return
        except subprocess.TimeoutExpired:
            lines = [ln for ln in re.split(r"[\r\n]", stdout.read_text(errors="replace")) if ln.strip()]
            last = f": {lines[-1].strip()[:100]}" if lines else ""
            print(f"quoted_numbers: {name}: {time.perf_counter() - start:.0f} s{last}", flush=True)


def runs_to_do(adamw_lrs: list[str], runs: Path) -> list[tuple[str, list[str]]]:
    """(name, launcher arguments after ``torchrun --standalone --nproc_per_node=N``) per run."""
    todo = [("SOAP", ["launchers/pretrain.py", "--out", str(runs / "soap")])]
    for lr in adamw_lrs:
        args = ["launchers/pretrain.py", "--optimizer", "adamw", "--set", f"optim.betas={ADAMW_BETAS}"]
        args += ["--set", f"optim.lr={lr}", "--out", str(runs / f"adamw-lr{lr}")]
        todo.append((f"AdamW lr {lr}", args))
    return todo


def run_one(name: str, args: list[str], nproc: int, log_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    shown = shlex.join(["torchrun", "--standalone", f"--nproc_per_node={nproc}", *args])  # quotes [0.9,0.95]
    print(f"quoted_numbers: {name}: {shown}", flush=True)
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()
    out_path, err_path = log_dir / f"{stem}.stdout", log_dir / f"{stem}.stderr"
    start = time.perf_counter()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        try:
            wait_showing_progress(proc, name, out_path)
        finally:
            if proc.poll() is None:  # interrupted here: stop the run too
                proc.terminate()
                proc.wait()
    wall = time.perf_counter() - start
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    if proc.returncode != 0:
        sys.exit(
            f"quoted_numbers: {name} failed (exit {proc.returncode}); see {err_path}. The results file "
            "was not written; the runs that finished printed their losses above"
        )
    m = DONE.search(stdout)
    if m is None:
        sys.exit(f"quoted_numbers: {name}: no 'pretrain: done' line in its output ({log_dir / stem}.stdout)")
    run_dir = ROOT / args[args.index("--out") + 1]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    # a progress bar redraws with \r; a warning is a line of its own (or glued to a bar's redraw)
    warnings = [ln for ln in re.split(r"[\r\n]", stderr) if re.search(r"warn", ln, re.IGNORECASE)]
    print(f"quoted_numbers: {name}: train {m.group(2)}, held-out {m.group(3)}, {wall:.0f} s", flush=True)
    return {
        "name": name,
        "command": shown,
        "steps": int(m.group(1)),
        "train": float(m.group(2)),
        "eval": float(m.group(3)),
        "evals": evals,
        "wall_s": wall,
        "warnings": warnings,
    }


def report(results: list[dict], commit: str, dirty: bool, nproc: int) -> str:
    import torch

    steps = sorted({s for r in results for s in r["evals"]})
    lines = [
        "# The main job's losses (written by `python launchers/quoted_numbers.py`)",
        "",
        f"- commit: `{commit}`{' (tree dirty: uncommitted changes)' if dirty else ' (clean tree)'}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{nproc} processes (gloo on CPU)",
        "- config: configs/pretrain/tiny-cpu.yaml as shipped (300 steps, global batch 32 x 128 bytes, "
        "warmup 20, cosine to 10%, weight decay 0.01 on matrices, clipping 1.0)",
        f"- AdamW: torch.optim.AdamW, betas {ADAMW_BETAS}, the same batches, steps, schedule and data; "
        "peak lr as named",
        "- losses in nats/byte; train = mean of the last 10 steps (the launcher's final line); "
        "wall time varies with the machine's load, the losses do not",
        "",
        "| run | final train loss | held-out loss | "
        + " | ".join(f"held-out @{s}" for s in steps)
        + " | wall |",
        "|---|---|---|" + "---|" * len(steps) + "---|",
    ]
    for r in results:
        cells = [f"{r['evals'][s]:.4f}" if s in r["evals"] else "-" for s in steps]
        lines.append(
            f"| {r['name']} | {r['train']:.4f} | {r['eval']:.4f} | "
            + " | ".join(cells)
            + f" | {r['wall_s']:.0f} s |"
        )
    adamw = [r for r in results if r["name"].startswith("AdamW")]
    if adamw:
        best = min(adamw, key=lambda r: r["eval"])
        lines += ["", f"Best AdamW (lowest held-out loss): {best['name']}, {best['eval']:.4f}."]
    lines += ["", "Commands (from the repository root):", "", "```bash"]
    lines += [r["command"] for r in results]
    lines += ["```", ""]
    warned = [(r["name"], w) for r in results for w in r["warnings"]]
    if warned:
        lines += ["Lines of stderr mentioning a warning:", ""]
        lines += [f"- {name}: `{w.strip()}`" for name, w in warned]
    else:
        lines += ["No run printed a line mentioning a warning on stderr."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launchers/quoted_numbers.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--adamw-lrs",
        type=learning_rates,
        default="1e-3,3e-3,1e-2",
        help="comma-separated AdamW peak learning rates ('' for none; default: 1e-3,3e-3,1e-2)",
    )
    p.add_argument(
        "--runs",
        type=Path,
        default=ROOT / "runs" / "quoted-numbers",
        help="where the runs go (default: runs/quoted-numbers in the repository; a relative path is "
        "taken from the current directory)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=ROOT / "docs" / "bench_results" / "main_job.md",
        help="the results file, overwritten (default: docs/bench_results/main_job.md in the repository)",
    )
    p.add_argument("--nproc", type=positive, default=2, help="processes per run (default: 2, the main job's)")
    p.add_argument(
        "--force", action="store_true", help="delete --runs first if it holds earlier runs of this tool"
    )
    args = p.parse_args(argv)
    runs, out = args.runs.resolve(), args.results.resolve()
    if out.is_dir():
        p.error(f"argument --results: {out} is a directory; give a file")
    commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain"))
    prepare_runs(runs, args.force)
    lrs = args.adamw_lrs
    shown = runs.relative_to(ROOT) if runs.is_relative_to(ROOT) else runs  # commands read from the root
    results = [run_one(name, a, args.nproc, runs) for name, a in runs_to_do(lrs, shown)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results, commit, dirty, args.nproc))
    print(f"quoted_numbers: wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
