"""Issue 11's GPU checks as one prepared run: ``python3 launchers/gpu_suite.py --out DIR``.

On one GPU, in at most 8 minutes (``--budget``), four parts, each with its own time budget and a
timeout on every command it starts (a part whose time is gone is skipped, and what was measured is
still written):

r. the GPU-marked tests (``pytest -m gpu``, first: they are the verdict): the QR, the side-stream
   refresh, no host sync in a step, and a SOAP collective's wait on NCCL that must not block the
   host; then where a refresh's time goes (``python -m soap_dist.bench.refresh_parts``): each piece
   of the refresh per factor size of the gpt2-medium set, and the full refresh summed from them;
a. the step benchmark, gpt2-medium shapes, TF32 (``python -m soap_dist.bench --json``), twice: the
   default refresh schedule and ``refresh_schedule='staggered'`` with ``refresh_delay=1``;
b. a real training loop: gpt2-small (configs/pretrain/gpt2-small.yaml, launchers/pretrain.py, one
   process, bf16 autocast, SOAP with refresh_delay=1), a short run twice: as configured, and with the
   refresh switched off (precondition_frequency 10**9); mean step time from metrics.jsonl;
c. the race: configs/pretrain/gpu-race.yaml with AdamW, then SOAP, then (when four runs fit) AdamW at
   half and twice its lr, the race being against the best AdamW run (a short SOAP calibration run
   first shortens every run, schedule included, when the whole config would not fit the time left),
   then launchers/compare_runs.py for loss against wall-clock and against step.

Everything goes under --out, a new or empty folder: ``summary.md`` (the card, torch, commit, date,
and one table of target vs measured with PASS/FAIL), ``summary.json``, the race's two plots, and
``raw.tar.gz`` (every command's log, the bench JSONs, each run's metrics.jsonl, config.yaml and
loss.png, the comparison tables). Few files on purpose: the device tool brings back at most 8. Run
directories (checkpoints) live in a temporary directory that is removed at the end. Ctrl-C or
SIGTERM ends the running command too and still writes the summary, marked as cut off (exit 130).

``--smoke`` runs every part tiny on the CPU (CUDA hidden), to check the plumbing without a GPU.
Needs the train extra (pyyaml, tqdm, numpy, matplotlib), as the launchers it starts do; the GPU
image has them.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from soap_apps.gpu_suite.context import Ctx
from soap_apps.gpu_suite.header import header
from soap_apps.gpu_suite.race import part_c
from soap_apps.gpu_suite.refresh_pieces import part_r
from soap_apps.gpu_suite.running import Clock, Runner, log
from soap_apps.gpu_suite.settings import MIN_CMD_S, REPO
from soap_apps.gpu_suite.step_bench import part_a
from soap_apps.gpu_suite.summary import Summary
from soap_apps.gpu_suite.training_loop import part_b

PARTS = "rabc"  # the parts, in the order they run


def _parts_problem(parts: str) -> str | None:
    """What is wrong with a --parts value (None: nothing)."""
    if not parts:
        return "empty"
    unknown = [c for c in dict.fromkeys(parts) if c not in PARTS]
    if unknown:
        return "unknown " + ", ".join(map(repr, unknown))
    return "repeated" if len(set(parts)) != len(parts) else None


def _out_problem(out: Path) -> str | None:
    """What keeps --out from taking this run's files alone (None: nothing): a file, a folder that
    cannot be made, or one that holds files already (an earlier run's plots would sit beside this
    summary as if they were its own)."""
    if out.exists() and not out.is_dir():
        return "is a file"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot be made ({e.strerror or e})"
    if any(out.iterdir()):
        return "already holds files (an earlier run's?): give a new or empty folder"
    return None


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a timeout, the device tool) ends the suite like Ctrl-C: the running command's process
    group is ended and the summary written, marked as cut off."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts in turn, writing the summary after each; always end with the archive."""
    p = argparse.ArgumentParser(
        prog="launchers/gpu_suite.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="where summary.md and the raw outputs go")
    p.add_argument("--smoke", action="store_true", help="every part tiny, on the CPU (checks the plumbing)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="total seconds, > 0 (default 480 on GPU, 140 with --smoke)",
    )
    p.add_argument(
        "--parts",
        default=PARTS,
        help="which parts to run: some of the letters r, a, b, c, each at most once (they run in that "
        "order): r = where a refresh's time goes (each refresh piece per factor size, then the "
        "GPU-marked tests of the QR and the side-stream refresh); a = the step benchmark, gpt2-medium "
        "shapes, default and staggered refresh; b = a gpt2-small training loop, refresh on and off; "
        "c = the race, SOAP against AdamW on gpu-race.yaml, loss against wall-clock (default: rabc)",
    )
    p.add_argument("--commit", default=None, help="the commit to report when there is no git checkout")
    p.add_argument("--keep-raw", action="store_true", help="leave raw/ as a folder beside raw.tar.gz")
    args = p.parse_args(argv)
    if (problem := _parts_problem(args.parts)) is not None:
        p.error(
            f"--parts must be some of the letters r, a, b, c, each at most once; "
            f"got {args.parts!r} ({problem})"
        )
    if args.budget is not None and not (args.budget > 0 and math.isfinite(args.budget)):
        p.error(f"--budget must be a number of seconds > 0, got {args.budget:g}")
    budget = args.budget if args.budget is not None else (140.0 if args.smoke else 480.0)
    clock = Clock(budget)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="5")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: run on a GPU, or pass --smoke for the CPU plumbing check")
    out = args.out.resolve()
    if (problem := _out_problem(out)) is not None:
        p.error(f"argument --out: {out} {problem}")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    env.setdefault("SOAP_DIST_CACHE", str(Path.home() / ".cache" / "soap_dist"))
    runner = Runner(raw, env)
    summary = Summary(out, header(args), args.smoke)
    ctx = Ctx(args, out, raw, scratch, clock, runner, summary)
    parts: list[tuple[str, Callable[[Ctx], None]]] = [
        ("r", part_r),
        ("a", part_a),
        ("b", part_b),
        ("c", part_c),
    ]
    finished = False
    try:
        for name, fn in parts:
            if name not in args.parts:
                continue
            ctx.begin(name)
            log(f"part {name}: {ctx.part_left(name):.0f} s")
            if ctx.part_left(name) < MIN_CMD_S:
                summary.skipped(
                    name, "(the whole part)", "-", f"time is up ({clock.elapsed():.0f} s into the suite)"
                )
            else:
                try:
                    fn(ctx)
                except Exception as e:  # one part's bug must not lose the others' numbers
                    summary.note(name, f"the part stopped with {type(e).__name__}: {e}")
                    log(f"part {name} stopped: {e!r}")
            summary.write(runner, clock, done=False)
        finished = True
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (above): what was measured is still written
        what = str(stop) or "Ctrl-C"  # a bare KeyboardInterrupt has no text
        summary.note("suite", f"interrupted ({what}) {clock.elapsed():.0f} s into the suite")
        log(f"interrupted ({what}): writing what was measured")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        summary.write(runner, clock, done=finished)
        with tarfile.open(out / "raw.tar.gz", "w:gz") as tar:
            tar.add(raw, arcname="raw")
        if not args.keep_raw:
            shutil.rmtree(raw, ignore_errors=True)
    log(f"{'done' if finished else 'cut off'} in {clock.elapsed():.0f} s: {out / 'summary.md'}")
    print((out / "summary.md").read_text(), flush=True)
    return 0 if finished else 130


if __name__ == "__main__":
    raise SystemExit(main())
