"""Issue 11's GPU checks as one prepared run: ``python3 launchers/gpu_suite.py --out DIR``.

On one GPU, in at most 8 minutes (``--budget``), four parts, each with its own time budget and a
timeout on every command it starts (a part whose time is gone is skipped, and what was measured is
still written):

r. where a refresh's time goes (``python -m soap_dist.bench.refresh_parts``): each piece of the
   refresh per factor size of the gpt2-medium set, and the full refresh summed from them;
a. the step benchmark, gpt2-medium shapes, TF32 (``python -m soap_dist.bench --json``), twice: the
   default refresh schedule and ``refresh_schedule='staggered'``;
b. a real training loop: gpt2-small (configs/pretrain/gpt2-small.yaml, launchers/pretrain.py, one
   process, bf16 autocast, SOAP with refresh_delay=1), a short run twice: as configured, and with the
   refresh switched off (precondition_frequency 10**9); mean step time from metrics.jsonl;
c. the race: configs/pretrain/gpu-race.yaml with AdamW, then SOAP (a short SOAP calibration run first
   shortens both, schedule included, when the whole config would not fit the time left), then
   launchers/compare_runs.py for loss against wall-clock and against step.

Everything goes under --out: ``summary.md`` (the card, torch, commit, date, and one table of target
vs measured with PASS/FAIL), ``summary.json``, the race's two plots, and ``raw.tar.gz`` (every
command's log, the bench JSONs, each run's metrics.jsonl, config.yaml and loss.png, the comparison
tables). Few files on purpose: the device tool brings back at most 8. Run directories (checkpoints)
live in a temporary directory that is removed at the end.

``--smoke`` runs every part tiny on the CPU (CUDA hidden), to check the plumbing without a GPU.
Stdlib and torch only (the launchers it starts need the train extra: pyyaml, tqdm, numpy, matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launchers" / "pretrain.py"
COMPARE = REPO / "launchers" / "compare_runs.py"
GPT2_SMALL = REPO / "configs" / "pretrain" / "gpt2-small.yaml"
RACE = REPO / "configs" / "pretrain" / "gpu-race.yaml"

# The targets
REFRESH_MAX_S = 0.3  # a: full refresh (refresh step - median step), default schedule
MEDIAN_OVER_FLOOR = 1.15  # a: step between refreshes / matmul floor
AMORTIZED_OVER_FLOOR = 2.0  # a: amortized step (k = 10) / floor
STAGGER_WORST_OVER_MEDIAN = 1.3  # a: staggered: worst step / median step
LOOP_OVER_NO_REFRESH = 1.10  # b: mean step / the refresh-off run's
RACE_TIME_RATIO = 0.8  # c: SOAP's time to AdamW's final held-out loss / AdamW's time
OPTIMIZER_SHARE = 0.15  # c: SOAP's optimizer time / SOAP's step time

# Seconds per part (the race gets what the others leave) and the most one command may take.
GPU_PLAN = {"r": 45.0, "a": 130.0, "b": 120.0, "bench_cmd": 75.0, "train_cmd": 60.0, "calibrate_cmd": 45.0}
SMOKE_PLAN = {"r": 30.0, "a": 40.0, "b": 40.0, "bench_cmd": 30.0, "train_cmd": 30.0, "calibrate_cmd": 30.0}
RESERVE_S = 12.0  # kept back for the comparison plots, the summary and the archive
MIN_CMD_S = 20.0  # a command given less than this is not started
B_STEPS, B_DROP = 40, 10  # part b: steps per run, and the first steps left out of the mean
CALIBRATE_STEPS = 20

# Smoke mode: the same commands, shrunk to seconds on a CPU.
SMOKE_BENCH = [
    "--model",
    "gpt2-small",
    "--layers",
    "1",
    "--device",
    "cpu",
    "--steps",
    "2",
    "--warmup",
    "0",
    "--precondition-frequency",
    "2",
    "--max-precond-dim",
    "64",
    "--threads",
    "1",
]
SMOKE_MODEL = [
    "model.seq_len=32",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "train.micro_batch=4",
    "train.grad_accum=1",
    "train.eval_batches=1",
    "train.threads=1",
    "optim.fused=false",
    "schedule.warmup_steps=2",
]
SMOKE_B_STEPS, SMOKE_B_DROP = 6, 2
SMOKE_RACE_STEPS = 8


def log(msg: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# running commands under a deadline


class Clock:
    """The suite's deadline, and each part's."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + budget_s - RESERVE_S

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Runner:
    """Starts commands with a timeout (the whole process group is ended on expiry) and logs them."""

    def __init__(self, raw: Path, env: dict[str, str]) -> None:
        self.raw, self.env = raw, env
        self.commands: list[dict[str, Any]] = []

    def run(self, name: str, cmd: list[str], timeout: float) -> dict[str, Any]:
        logfile = self.raw / f"{name}.log"
        shown = " ".join(str(c) for c in cmd).replace(str(REPO) + "/", "")
        log(f"{name}: {shown} (timeout {timeout:.0f} s)")
        t0 = time.monotonic()
        timed_out = False
        with open(logfile, "w") as f:
            f.write(f"$ {shown}\n")
            f.flush()
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=REPO,
                env=self.env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                timed_out = True
                _end_group(proc)
                rc = proc.returncode
        seconds = time.monotonic() - t0
        result = {
            "name": name,
            "command": shown,
            "rc": rc,
            "seconds": round(seconds, 1),
            "timed_out": timed_out,
            "log": logfile.name,
        }
        self.commands.append(result)
        log(f"{name}: rc {rc}{' (timed out)' if timed_out else ''} after {seconds:.1f} s")
        return result


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's own process group (its compile workers too), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------------
# reading results


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a timeout
            pass
    return out


def per_step_seconds(records: list[dict[str, Any]]) -> dict[int, float]:
    """Seconds of each logged interval, per step, keyed by the interval's last step: only intervals
    with no held-out evaluation in them (an eval record between two training records)."""
    out: dict[int, float] = {}
    prev: dict[str, Any] | None = None
    eval_since = False
    for r in records:
        if "eval_loss" in r:
            eval_since = True
            continue
        if "loss" not in r:
            continue
        if prev is not None and not eval_since and r["step"] > prev["step"]:
            out[r["step"]] = (r["elapsed_s"] - prev["elapsed_s"]) / (r["step"] - prev["step"])
        prev, eval_since = r, False
    return out


def mean_step(records: list[dict[str, Any]], after: int) -> tuple[float | None, int]:
    """Mean seconds per step over the clean intervals ending after step ``after`` (and the step count)."""
    train = [r for r in records if "loss" in r]
    secs = per_step_seconds(records)
    steps_of = {r["step"]: r["step"] - p["step"] for p, r in zip(train, train[1:], strict=False)}
    kept = [(s, dt) for s, dt in secs.items() if s - steps_of.get(s, 1) >= after]
    n = sum(steps_of.get(s, 1) for s, _ in kept)
    return (sum(dt * steps_of.get(s, 1) for s, dt in kept) / n if n else None), n


def elapsed_at(records: list[dict[str, Any]], step: int) -> float | None:
    """Seconds in the loop at ``step``, interpolated between training records."""
    train = [(r["step"], r["elapsed_s"]) for r in records if "loss" in r]
    if not train or step > train[-1][0]:
        return None
    prev = (0, 0.0)
    for s, e in train:
        if s >= step:
            return prev[1] + (e - prev[1]) * (step - prev[0]) / max(1, s - prev[0])
        prev = (s, e)
    return None


def evals(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return sorted({int(r["step"]): float(r["eval_loss"]) for r in records if "eval_loss" in r}.items())


def flat_yaml(path: Path) -> dict[str, str]:
    """``section.key -> raw value`` of a two-level YAML file like configs/pretrain/*.yaml (stdlib only)."""
    out, section = {}, ""
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].rstrip()
        if not text.strip():
            continue
        if not line.startswith(" ") and text.endswith(":"):
            section = text[:-1].strip()
        elif ":" in text:
            key, value = text.strip().split(":", 1)
            out[f"{section}.{key.strip()}"] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------------
# the summary


class Summary:
    def __init__(self, out: Path, header: list[str], smoke: bool) -> None:
        self.out, self.header, self.smoke = out, header, smoke
        self.rows: list[dict[str, Any]] = []
        self.notes: dict[str, list[str]] = {}
        self.numbers: dict[str, Any] = {}

    def check(
        self,
        part: str,
        what: str,
        target: str,
        value: float | None,
        limit: float | None,
        fmt: str = "{:.2f}x",
        note: str = "",
    ) -> None:
        """A row: PASS when value <= limit; NOT MEASURED when value is None."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            measured, verdict = "-", "NOT MEASURED"
        else:
            measured = fmt.format(value)
            verdict = "info" if limit is None else ("PASS" if value <= limit else "FAIL")
        self.rows.append(
            {
                "part": part,
                "what": what,
                "target": target,
                "measured": measured,
                "verdict": verdict,
                "note": note,
                "value": value,
            }
        )

    def skipped(self, part: str, what: str, target: str, why: str) -> None:
        self.rows.append(
            {
                "part": part,
                "what": what,
                "target": target,
                "measured": "-",
                "verdict": "SKIPPED",
                "note": why,
                "value": None,
            }
        )

    def note(self, part: str, text: str) -> None:
        self.notes.setdefault(part, []).append(text)

    def write(self, runner: Runner, clock: Clock, done: bool) -> None:
        lines = [
            "# Issue 11: the prepared GPU run"
            + (" (SMOKE: tiny, on the CPU; plumbing only)" if self.smoke else ""),
            "",
        ]
        lines += [f"- {h}" for h in self.header]
        lines += [
            f"- suite wall time: {clock.elapsed():.0f} s" + ("" if done else " (still running or cut off)"),
            "",
        ]
        lines += ["| part | measure | target | measured | verdict | note |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(
                f"| {r['part']} | {r['what']} | {r['target']} | {r['measured']} | **{r['verdict']}** "
                f"| {r['note']} |"
            )
        for part in sorted(self.notes):
            lines += ["", f"## {part}", ""] + [f"- {n}" for n in self.notes[part]]
        lines += [
            "",
            "## Commands",
            "",
            "| command | rc | seconds | timed out | log (in raw.tar.gz) |",
            "|---|---|---|---|---|",
        ]
        for c in runner.commands:
            lines.append(f"| `{c['command']}` | {c['rc']} | {c['seconds']} | {c['timed_out']} | {c['log']} |")
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        payload = {
            "header": self.header,
            "rows": self.rows,
            "notes": self.notes,
            "numbers": self.numbers,
            "commands": runner.commands,
            "smoke": self.smoke,
            "done": done,
        }
        (self.out / "summary.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------
# part a: the step benchmark


def part_r(ctx: Ctx) -> None:
    """Where a refresh's time goes (soap_dist.bench.refresh_parts): per piece, per factor size."""
    s = ctx.summary
    timeout = ctx.cmd_timeout("r", "bench_cmd")
    if timeout is None:
        s.note("r", "refresh pieces: skipped, no time left in the part's budget")
        return
    js = ctx.raw / "r_refresh_parts.json"
    extra = ["--sizes", "64,96", "--max-batch", "2", "--repeats", "1"] if ctx.smoke else []
    cmd = [sys.executable, "-m", "soap_dist.bench.refresh_parts", "--model", "gpt2-medium", "--json", js]
    r = ctx.runner.run("r_refresh_parts", cmd + extra, timeout)
    if not js.is_file():
        s.note("r", f"refresh pieces: no JSON (rc {r['rc']}); see {r['log']}")
        return
    numbers = json.loads(js.read_text())
    s.numbers["r"] = numbers
    for name, seconds in numbers["totals_s"].items():
        s.check(
            "r",
            f"gpt2-medium full refresh from the pieces, {name}",
            "(information)",
            seconds,
            None,
            "{:.3f} s",
            "sum over the factor set of the per-factor time of one chunk",
        )
    s.note("r", f"the per-piece table is in raw/{r['log']}")


def part_a(ctx: Ctx) -> None:
    s, runner = ctx.summary, ctx.runner
    names = ("a. bench, refresh 'all'", "a. bench, 'staggered'")
    base = ["-m", "soap_dist.bench", "--only", "floor,soap_dist"]
    base += SMOKE_BENCH if ctx.smoke else ["--model", "gpt2-medium", "--tf32"]
    variants = [("a1_bench_all", []), ("a2_bench_staggered", ["--soap-kw", "refresh_schedule='staggered'"])]
    results: dict[str, dict[str, Any] | None] = {}
    for (name, extra), label in zip(variants, names, strict=True):
        timeout = ctx.cmd_timeout("a", "bench_cmd")
        if timeout is None:
            results[name] = None
            s.note("a", f"{label}: skipped, no time left in the part's budget")
            continue
        js = ctx.raw / f"{name}.json"
        r = runner.run(name, [sys.executable, *base, *extra, "--json", js], timeout)
        results[name] = _bench_numbers(js) if js.is_file() else None
        if results[name] is None:
            s.note(
                "a",
                f"{label}: no JSON (rc {r['rc']}{', timed out' if r['timed_out'] else ''}); see {r['log']}",
            )
    full = results.get("a1_bench_all")
    stag = results.get("a2_bench_staggered")
    s.numbers["a"] = {"all": full, "staggered": stag}
    if full is None:
        for what, tgt in (
            ("full refresh (refresh step - median step)", f"<= {REFRESH_MAX_S} s"),
            ("median step / floor", f"<= {MEDIAN_OVER_FLOOR}x"),
            ("amortized step k=10 / floor", f"<= {AMORTIZED_OVER_FLOOR}x"),
        ):
            s.skipped("a", what, tgt, "no result (see notes)")
    else:
        s.check(
            "a",
            "full refresh (refresh step - median step)",
            f"<= {REFRESH_MAX_S} s",
            full["refresh_s"],
            REFRESH_MAX_S,
            "{:.3f} s",
            f"refresh step {_ms(full['refresh_step_s'])}, median {_ms(full['median_s'])}",
        )
        s.check(
            "a",
            "median step / floor",
            f"<= {MEDIAN_OVER_FLOOR}x",
            full["median_over_floor"],
            MEDIAN_OVER_FLOOR,
            note=f"floor {_ms(full['floor_s'])}",
        )
        s.check(
            "a",
            f"amortized step k={full['k']} / floor",
            f"<= {AMORTIZED_OVER_FLOOR}x",
            full["amortized_over_floor"],
            AMORTIZED_OVER_FLOOR,
            note=f"amortized {_ms(full['amortized_s'])}",
        )
    if stag is None:
        s.skipped(
            "a",
            "staggered: worst step / median step",
            f"<= {STAGGER_WORST_OVER_MEDIAN}x",
            "no result (see notes)",
        )
    else:
        s.check(
            "a",
            "staggered: worst step / median step",
            f"<= {STAGGER_WORST_OVER_MEDIAN}x",
            stag["worst_over_median_all"],
            STAGGER_WORST_OVER_MEDIAN,
            note=f"worst {_ms(stag['worst_s'])}, median of all timed steps {_ms(stag['median_all_s'])}",
        )
        s.check(
            "a",
            f"staggered: mean of {stag['k']} steps / floor",
            "(information)",
            stag["cycle_over_floor"],
            None,
            note="the amortized cost of the staggered schedule",
        )
    s.note(
        "a",
        "numbers from the bench's --json: soap_dist's median_s (steps t % k != 0), refresh_s (the "
        "refresh steps' median; 'full refresh' is it minus median_s), amortized_s = ((k-1) median + "
        "refresh) / k, the floor's median_s; staggered: worst and median over every timed step",
    )


def _ms(x: float | None) -> str:
    return "-" if x is None else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


def _bench_numbers(path: Path) -> dict[str, Any] | None:
    data = json.loads(path.read_text())
    results = data.get("results") or []
    if results and isinstance(results[0], list):  # --rounds > 1
        results = results[-1]
    by = {r["name"]: r for r in results}
    soap, floor = by.get("soap_dist"), by.get("floor")
    if soap is None or floor is None:
        return None
    k = int(data.get("config", {}).get("precondition_frequency") or 10)
    times = [float(t[1]) for t in soap["steps"]]
    median_all = statistics.median(times)
    fl = floor["median_s"]
    refresh = soap["refresh_s"] - soap["median_s"] if soap.get("refresh_s") is not None else None
    cycle = soap.get("cycle_mean_s")
    return {
        "k": k,
        "floor_s": fl,
        "median_s": soap["median_s"],
        "refresh_step_s": soap.get("refresh_s"),
        "refresh_s": refresh,
        "amortized_s": soap["amortized_s"],
        "worst_s": soap["worst_s"],
        "median_all_s": median_all,
        "cycle_mean_s": cycle,
        "init_s": soap["init_s"],
        "median_over_floor": soap["median_s"] / fl,
        "amortized_over_floor": soap["amortized_s"] / fl,
        "worst_over_median_all": soap["worst_s"] / median_all,
        "cycle_over_floor": None if cycle is None else cycle / fl,
        "peak_bytes": soap.get("peak_bytes"),
    }


# ---------------------------------------------------------------------------------------------------
# part b: the training loop, refresh on and off


def part_b(ctx: Ctx) -> None:
    s = ctx.summary
    steps, drop = (SMOKE_B_STEPS, SMOKE_B_DROP) if ctx.smoke else (B_STEPS, B_DROP)
    sets = [
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.checkpoint_every=0",
        "train.keep_checkpoints=1",
        "optim.refresh_delay=1",
        "parallel.mode=single",
    ]
    if ctx.smoke:
        sets += SMOKE_MODEL
    means: dict[str, float | None] = {}
    for name, extra in (
        ("b1_train_refresh_on", []),
        ("b2_train_refresh_off", ["optim.precondition_frequency=1000000000"]),
    ):
        timeout = ctx.cmd_timeout("b", "train_cmd")
        if timeout is None:
            s.note("b", f"{name}: skipped, no time left in the part's budget")
            means[name] = None
            continue
        run_dir = ctx.scratch / name
        ctx.pretrain(name, GPT2_SMALL, run_dir, sets + extra, timeout)
        records = read_metrics(run_dir / "metrics.jsonl")
        ctx.keep_run(name, run_dir)
        mean, n = mean_step(records, drop)
        secs = [v for st, v in per_step_seconds(records).items() if st > drop]
        means[name] = mean
        s.numbers.setdefault("b", {})[name] = {
            "mean_step_s": mean,
            "steps_in_mean": n,
            "median_step_s": statistics.median(secs) if secs else None,
            "worst_step_s": max(secs) if secs else None,
            "last_step": max((r["step"] for r in records if "loss" in r), default=0),
        }
        if mean is not None:
            s.note(
                "b",
                f"{name}: mean step {_ms(mean)} over {n} steps (steps {drop + 1}..), median "
                f"{_ms(statistics.median(secs))}, worst {_ms(max(secs))}",
            )
    on, off = means.get("b1_train_refresh_on"), means.get("b2_train_refresh_off")
    target = f"<= {LOOP_OVER_NO_REFRESH}x"
    if on is None or off is None:
        s.skipped(
            "b", "gpt2-small loop: mean step / refresh-off mean step", target, "a run is missing (see notes)"
        )
    else:
        s.check(
            "b",
            "gpt2-small loop: mean step / refresh-off mean step",
            target,
            on / off,
            LOOP_OVER_NO_REFRESH,
            note=f"{_ms(on)} vs {_ms(off)}; SOAP, refresh_delay 1, bf16, {steps} steps, first {drop} dropped",
        )
    s.note(
        "b",
        "per-step seconds from metrics.jsonl (log_every 1: one record, so one host sync, per step); "
        "the refresh-off run sets optim.precondition_frequency=10**9 (the first call's eigh still runs, "
        "in a dropped step)",
    )


# ---------------------------------------------------------------------------------------------------
# part c: the race


def part_c(ctx: Ctx) -> None:
    s = ctx.summary
    cfg = flat_yaml(RACE)
    cfg_steps = int(cfg["train.steps"])
    cfg_eval, cfg_warm = int(cfg["train.eval_every"]), int(cfg["schedule.warmup_steps"])
    smoke_sets = SMOKE_MODEL + ["train.log_every=1", "train.eval_every=4"] if ctx.smoke else []
    targets = (
        ("SOAP's time to AdamW's final held-out loss / AdamW's time", f"<= {RACE_TIME_RATIO}x"),
        ("optimizer share of SOAP's step time", f"<= {OPTIMIZER_SHARE:.0%}"),
    )

    # calibration: SOAP's step time on this card, to fit both runs into the time left
    steps = SMOKE_RACE_STEPS if ctx.smoke else cfg_steps
    timeout = ctx.cmd_timeout("c", "calibrate_cmd")
    if timeout is None:
        for what, tgt in targets:
            s.skipped("c", what, tgt, "no time left")
        return
    cal_dir = ctx.scratch / "c0_calibrate_soap"
    cal_steps = 4 if ctx.smoke else CALIBRATE_STEPS
    r = ctx.pretrain(
        "c0_calibrate_soap",
        RACE,
        cal_dir,
        smoke_sets + [f"train.steps={cal_steps}", "train.eval_every=0", f"train.log_every={cal_steps // 2}"],
        timeout,
    )
    cal = read_metrics(cal_dir / "metrics.jsonl")
    ctx.keep_run("c0_calibrate_soap", cal_dir)
    t_soap, _ = mean_step(cal, cal_steps // 2)
    last_elapsed = max((x["elapsed_s"] for x in cal if "loss" in x), default=None)
    if t_soap is None or last_elapsed is None:
        s.note("c", f"calibration gave no step time (rc {r['rc']}); the race runs as configured")
        overhead = 30.0
    else:
        overhead = max(5.0, r["seconds"] - last_elapsed)
        s.note(
            "c",
            f"calibration (SOAP, {cal_steps} steps): {_ms(t_soap)} per step after step {cal_steps // 2}, "
            f"{overhead:.0f} s of start-up and end per run",
        )
    if not ctx.smoke and t_soap is not None:
        per_run = (ctx.part_left("c") - 2 * 8.0) / 2 - overhead  # 8 s per comparison plot
        fit = int(per_run / (t_soap * 1.1)) // 10 * 10  # AdamW's step counted as long as SOAP's, +10%
        if fit < cfg_steps:
            steps = max(50, fit)
            s.note(
                "c",
                f"the config's {cfg_steps} steps would not fit the {ctx.part_left('c'):.0f} s left: "
                f"both runs shortened to {steps} steps (the schedule spans them)",
            )
    sets = list(smoke_sets)
    if steps != cfg_steps:
        eval_every = 4 if ctx.smoke else max(10, steps // 20 // 10 * 10)
        sets += [
            f"train.steps={steps}",
            f"train.eval_every={eval_every}",
            f"schedule.warmup_steps={min(cfg_warm, max(1, steps // 10))}",
        ]
    else:
        eval_every = cfg_eval
    runs = {"c1_race_adamw": ["optim.name=adamw", "optim.betas=[0.9,0.95]"], "c2_race_soap": []}
    records: dict[str, list[dict[str, Any]]] = {}
    timed_out: dict[str, bool] = {}
    for name, extra in runs.items():
        left = min(ctx.part_left("c"), ctx.clock.left()) - 16.0  # 8 s for each comparison plot
        # AdamW first: its run is the cheaper one and sets the mark; SOAP then gets all that is left,
        # so even a SOAP run cut by its timeout has had AdamW's whole time to reach AdamW's loss
        timeout = left / 2 + 10.0 if name == "c1_race_adamw" else left
        if timeout < MIN_CMD_S:
            s.note("c", f"{name}: skipped, no time left")
            continue
        run_dir = ctx.scratch / name
        res = ctx.pretrain(name, RACE, run_dir, sets + extra, timeout)
        records[name] = read_metrics(run_dir / "metrics.jsonl")
        timed_out[name] = res["timed_out"]
        ctx.keep_run(name, run_dir)
    adamw, soap = records.get("c1_race_adamw", []), records.get("c2_race_soap", [])
    if adamw and soap and any("loss" in x for x in adamw) and any("loss" in x for x in soap):
        dirs = [ctx.scratch / "c2_race_soap", ctx.scratch / "c1_race_adamw"]
        for x, png in (("time", "race_loss_vs_time.png"), ("step", "race_loss_vs_step.png")):
            if ctx.clock.left() + RESERVE_S > 10:
                res = ctx.runner.run(
                    f"c3_compare_{x}",
                    [
                        sys.executable,
                        COMPARE,
                        *dirs,
                        "--names",
                        "SOAP",
                        "AdamW",
                        "--x",
                        x,
                        "--title",
                        f"gpu-race: SOAP vs AdamW, loss vs {x}",
                        "--out",
                        ctx.out / png,
                    ],
                    30.0,
                )
                if res["rc"] != 0:
                    s.note("c", f"compare_runs --x {x} failed (rc {res['rc']}); see {res['log']}")
    _race_verdicts(ctx, adamw, soap, timed_out, steps, eval_every)


def _race_verdicts(
    ctx: Ctx,
    adamw: list[dict[str, Any]],
    soap: list[dict[str, Any]],
    timed_out: dict[str, bool],
    steps: int,
    eval_every: int,
) -> None:
    s = ctx.summary
    what_t = "SOAP's time to AdamW's final held-out loss / AdamW's time"
    what_o = "optimizer share of SOAP's step time"
    a_evals, s_evals = evals(adamw), evals(soap)
    a_last = max((r["step"] for r in adamw if "loss" in r), default=0)
    s_last = max((r["step"] for r in soap if "loss" in r), default=0)
    numbers: dict[str, Any] = {
        "steps": steps,
        "eval_every": eval_every,
        "adamw_last_step": a_last,
        "soap_last_step": s_last,
        "adamw_evals": a_evals,
        "soap_evals": s_evals,
    }
    if not a_evals or not s_evals:
        s.skipped("c", what_t, f"<= {RACE_TIME_RATIO}x", "a run has no held-out loss (see notes)")
    else:
        a_step, a_loss = a_evals[-1]
        a_time = elapsed_at(adamw, a_step)
        hit = next(((st, v) for st, v in s_evals if v <= a_loss), None)
        partial = [n for n, t in timed_out.items() if t]
        note = f"AdamW: {a_loss:.4f} at step {a_step}, {a_time:.1f} s in the loop"
        if partial:
            note += f"; cut by its timeout: {', '.join(partial)}"
        if hit is not None:
            s_time = elapsed_at(soap, hit[0])
            ratio = None if s_time is None or not a_time else s_time / a_time
            note += (
                f"; SOAP: {hit[1]:.4f} at step {hit[0]}, {s_time:.1f} s (first held-out point at or below)"
            )
            s.check("c", what_t, f"<= {RACE_TIME_RATIO}x", ratio, RACE_TIME_RATIO, note=note)
        else:
            s_time = max((r["elapsed_s"] for r in soap if "loss" in r), default=0.0)
            note += f"; SOAP never reached it (best {min(v for _, v in s_evals):.4f} in {s_time:.1f} s)"
            ratio = s_time / a_time if a_time else None
            if ratio is not None and ratio > RACE_TIME_RATIO:
                s.rows.append(
                    {
                        "part": "c",
                        "what": what_t,
                        "target": f"<= {RACE_TIME_RATIO}x",
                        "measured": f"> {ratio:.2f}x",
                        "verdict": "FAIL",
                        "note": note,
                        "value": None,
                    }
                )
            else:
                s.check(
                    "c",
                    what_t,
                    f"<= {RACE_TIME_RATIO}x",
                    None,
                    RACE_TIME_RATIO,
                    note=note + "; SOAP stopped before 0.8x of AdamW's time",
                )
        numbers["adamw_final_eval"], numbers["adamw_time_s"] = a_loss, a_time
    t_a, n_a = mean_step(adamw, 10 if not ctx.smoke else 2)
    t_s, n_s = mean_step(soap, 10 if not ctx.smoke else 2)
    numbers.update(adamw_step_s=t_a, soap_step_s=t_s)
    if t_a is None or t_s is None:
        s.skipped("c", what_o, f"<= {OPTIMIZER_SHARE:.0%}", "a run has too few step times")
    else:
        share = (t_s - t_a) / t_s
        s.check(
            "c",
            what_o,
            f"<= {OPTIMIZER_SHARE:.0%}",
            share,
            OPTIMIZER_SHARE,
            "{:.1%}",
            note=f"(SOAP step - AdamW step) / SOAP step: {_ms(t_s)} vs {_ms(t_a)} ({n_s}, {n_a} steps)",
        )
    s.numbers["c"] = numbers
    s.note(
        "c",
        "time = elapsed_s of metrics.jsonl (seconds in the training loop: start-up excluded, held-out "
        "evaluations included alike in both runs), interpolated at SOAP's first held-out point at or "
        "below AdamW's final held-out loss",
    )
    s.note(
        "c",
        "optimizer share: the metrics record no optimizer time, so it is measured as the difference "
        "of the two runs' mean step times (the same model, batch and data; intervals holding an "
        "evaluation and the first 10 steps left out) over SOAP's; AdamW's own fused step (~32M "
        "parameters, well under 1 ms) is not added back, so this slightly understates SOAP's share",
    )


# ---------------------------------------------------------------------------------------------------
# the driver


class Ctx:
    def __init__(
        self,
        args: argparse.Namespace,
        out: Path,
        raw: Path,
        scratch: Path,
        clock: Clock,
        runner: Runner,
        summary: Summary,
    ) -> None:
        self.smoke, self.out, self.raw, self.scratch = args.smoke, out, raw, scratch
        self.clock, self.runner, self.summary = clock, runner, summary
        self.plan = SMOKE_PLAN if args.smoke else GPU_PLAN
        self.part_end: dict[str, float] = {}

    def begin(self, part: str) -> None:
        budget = self.plan.get(part)
        end = self.clock.end if budget is None else min(self.clock.end, time.monotonic() + budget)
        self.part_end[part] = end

    def part_left(self, part: str) -> float:
        return self.part_end[part] - time.monotonic()

    def cmd_timeout(self, part: str, kind: str) -> float | None:
        t = min(self.plan[kind], self.part_left(part))
        return t if t >= MIN_CMD_S else None

    def pretrain(
        self, name: str, config: Path, run_dir: Path, sets: list[str], timeout: float
    ) -> dict[str, Any]:
        cmd = [sys.executable, PRETRAIN, "--config", config, "--out", run_dir]
        for item in sets:
            cmd += ["--set", item]
        return self.runner.run(name, cmd, timeout)

    def keep_run(self, name: str, run_dir: Path) -> None:
        """The run's small files into raw/ (checkpoints and the export stay behind)."""
        for f in ("metrics.jsonl", "config.yaml", "loss.png"):
            if (run_dir / f).is_file():
                shutil.copy(run_dir / f, self.raw / f"{name}.{f}")


def header(args: argparse.Namespace) -> list[str]:
    import torch

    if args.smoke:
        card = "CPU (smoke run: CUDA hidden)"
    elif torch.cuda.is_available():
        card = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        card = "no CUDA device"
    commit = args.commit or _git("rev-parse", "HEAD") or "unknown (no git here; pass --commit)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    if dirty:
        commit += " (with uncommitted changes)"
    return [
        f"card: {card}",
        f"torch {torch.__version__}, python {platform.python_version()}",
        f"commit: {commit}",
        f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"command: `{' '.join(['python3', 'launchers/gpu_suite.py', *sys.argv[1:]])}`",
    ]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="launchers/gpu_suite.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="where summary.md and the raw outputs go")
    p.add_argument("--smoke", action="store_true", help="every part tiny, on the CPU (checks the plumbing)")
    p.add_argument(
        "--budget", type=float, default=None, help="total seconds (default 480 on GPU, 100 with --smoke)"
    )
    p.add_argument("--parts", default="rabc", help="which parts to run (default: rabc)")
    p.add_argument("--commit", default=None, help="the commit to report when there is no git checkout")
    p.add_argument("--keep-raw", action="store_true", help="leave raw/ as a folder beside raw.tar.gz")
    args = p.parse_args(argv)
    budget = args.budget or (100.0 if args.smoke else 480.0)
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
    out.mkdir(parents=True, exist_ok=True)
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
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        summary.write(runner, clock, done=True)
        with tarfile.open(out / "raw.tar.gz", "w:gz") as tar:
            tar.add(raw, arcname="raw")
        if not args.keep_raw:
            shutil.rmtree(raw, ignore_errors=True)
    log(f"done in {clock.elapsed():.0f} s: {out / 'summary.md'}")
    print((out / "summary.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
