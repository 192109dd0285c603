"""Part c: the race, SOAP against AdamW on configs/pretrain/gpu-race.yaml, loss against wall-clock.

A short SOAP calibration run first sizes the runs to the time left. AdamW runs at the config's lr
and, when four runs fit at ``SWEEP_MIN_STEPS`` steps (or the config's, if fewer), at half and twice
it too: the brief's fair comparison is against AdamW at its best of at least three learning rates,
all reported. The race is against the best AdamW run that finished. The verdicts compare SOAP's
time to that run's final held-out loss, and SOAP's optimizer share of the step.
"""

from __future__ import annotations

import sys
from typing import Any

from soap_apps.gpu_suite.context import Ctx
from soap_apps.gpu_suite.results import elapsed_at, evals, flat_yaml, mean_step, read_metrics
from soap_apps.gpu_suite.settings import (
    ADAMW_LR_FACTORS,
    CALIBRATE_STEPS,
    COMPARE,
    MIN_CMD_S,
    OPTIMIZER_SHARE,
    RACE,
    RACE_TIME_RATIO,
    RESERVE_S,
    SMOKE_MODEL,
    SMOKE_RACE_STEPS,
    SWEEP_MIN_STEPS,
)
from soap_apps.gpu_suite.summary import format_seconds as _ms

PLOTS_S = 16.0  # kept back for the two comparison plots (8 s each)
SOAP_RUN = "c2_race_soap"
WHAT_TIME = "SOAP's time to AdamW's final held-out loss / AdamW's time"
WHAT_SHARE = "optimizer share of SOAP's step time"


def part_c(ctx: Ctx) -> None:
    """Calibrate, run AdamW (swept when it fits) and SOAP, plot loss against time and step, judge."""
    s = ctx.summary
    cfg = flat_yaml(RACE)
    cfg_steps, lr = int(cfg["train.steps"]), float(cfg["optim.lr"])
    smoke_sets = SMOKE_MODEL + ["train.log_every=1", "train.eval_every=4"] if ctx.smoke else []
    calibration = _calibrate(ctx, smoke_sets)
    if calibration is None:
        s.skipped("c", WHAT_TIME, f"<= {RACE_TIME_RATIO}x", "no time left")
        s.skipped("c", WHAT_SHARE, f"<= {OPTIMIZER_SHARE:.0%}", "no time left")
        return
    steps, sweep = _size(ctx, cfg_steps, *calibration)
    sets = list(smoke_sets)
    eval_every = int(cfg["train.eval_every"])
    if steps != cfg_steps:
        eval_every = 4 if ctx.smoke else max(10, steps // 20 // 10 * 10)
        warm = min(int(cfg["schedule.warmup_steps"]), max(1, steps // 10))
        sets += [f"train.steps={steps}", f"train.eval_every={eval_every}", f"schedule.warmup_steps={warm}"]
    factors = ADAMW_LR_FACTORS if sweep else ADAMW_LR_FACTORS[:1]
    adamw_lrs = {_adamw_name(i, f): lr * f for i, f in enumerate(factors)}
    adamw = ["optim.name=adamw", "optim.betas=[0.9,0.95]"]
    runs = {name: adamw + [f"optim.lr={x:g}"] for name, x in adamw_lrs.items()}
    order = [next(iter(runs)), SOAP_RUN, *list(runs)[1:]]  # the config's lr, SOAP, then the sweep's others
    runs[SOAP_RUN] = []
    records, timed_out = _run_in_order(ctx, order, runs, sets)
    best, sweep_rows = _best_adamw(records, timed_out, adamw_lrs, steps)
    _plots(ctx, records, adamw_lrs)
    if sweep_rows:
        s.note("c", "AdamW (betas 0.9, 0.95): " + "; ".join(map(_sweep_text, sweep_rows)))
        if best is not None:
            s.note("c", f"the race is against AdamW at lr {adamw_lrs[best]:g} (lowest final held-out loss)")
    if not sweep:
        s.note(
            "c",
            f"AdamW ran at the config's lr {lr:g} only: four runs of {min(cfg_steps, SWEEP_MIN_STEPS)}+ "
            "steps did not fit the time left, so this is not yet the brief's fair comparison (AdamW at its "
            "best of three learning rates); `launchers/gpu_suite.py --parts c` alone has the time for it",
        )
    _race_verdicts(ctx, records.get(best, []) if best else [], records.get(SOAP_RUN, []), timed_out, steps)
    s.numbers["c"].update(eval_every=eval_every, adamw_sweep=sweep_rows, adamw_best=best)


def _adamw_name(i: int, factor: float) -> str:
    return "c1_race_adamw" if i == 0 else f"c{i + 2}_adamw_lr_x{factor:g}"


def _sweep_text(row: dict[str, Any]) -> str:
    if row["final_eval"] is None:
        return f"lr {row['lr']:g}: no held-out loss"
    state = "finished" if row["finished"] else "cut short"
    return f"lr {row['lr']:g}: {row['final_eval']:.4f} at step {row['last_eval_step']} ({state})"


def _calibrate(ctx: Ctx, smoke_sets: list[str]) -> tuple[float | None, float] | None:
    """SOAP's step time on this card and the start-up/end seconds of a run; None: no time to run it."""
    s = ctx.summary
    timeout = ctx.cmd_timeout("c", "calibrate_cmd")
    if timeout is None:
        return None
    cal_dir = ctx.scratch / "c0_calibrate_soap"
    cal_steps = 4 if ctx.smoke else CALIBRATE_STEPS
    sets = smoke_sets + [f"train.steps={cal_steps}", "train.eval_every=0"]
    sets.append(f"train.log_every={cal_steps // 2}")
    r = ctx.pretrain("c0_calibrate_soap", RACE, cal_dir, sets, timeout)
    cal = read_metrics(cal_dir / "metrics.jsonl")
    ctx.keep_run("c0_calibrate_soap", cal_dir)
    t_soap, _ = mean_step(cal, cal_steps // 2)
    last_elapsed = max((x["elapsed_s"] for x in cal if "loss" in x), default=None)
    if t_soap is None or last_elapsed is None:
        s.note("c", f"calibration gave no step time (rc {r['rc']}); the race runs as configured")
        return None, 30.0
    overhead = max(5.0, r["seconds"] - last_elapsed)
    s.note(
        "c",
        f"calibration (SOAP, {cal_steps} steps): {_ms(t_soap)} per step after step {cal_steps // 2}, "
        f"{overhead:.0f} s of start-up and end per run",
    )
    return t_soap, overhead


def _size(ctx: Ctx, cfg_steps: int, t_soap: float | None, overhead: float) -> tuple[int, bool]:
    """Steps per run, and whether AdamW's lr sweep fits (four runs instead of two)."""
    if ctx.smoke:
        return SMOKE_RACE_STEPS, True
    if t_soap is None:
        return cfg_steps, False
    left = ctx.part_left("c") - PLOTS_S

    def fit(runs: int) -> int:  # AdamW's step counted as long as SOAP's, +10%
        return int((left / runs - overhead) / (t_soap * 1.1)) // 10 * 10

    sweep = fit(4) >= min(cfg_steps, SWEEP_MIN_STEPS)
    steps = min(cfg_steps, fit(4) if sweep else max(50, fit(2)))
    if steps < cfg_steps:
        ctx.summary.note(
            "c",
            f"the config's {cfg_steps} steps would not fit the {left:.0f} s left for {4 if sweep else 2} "
            f"runs: each shortened to {steps} steps (the schedule spans them)",
        )
    return steps, sweep


def _run_in_order(
    ctx: Ctx, order: list[str], runs: dict[str, list[str]], sets: list[str]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, bool]]:
    """Each run in turn, with a fair share of the time left. The first AdamW run sets the mark, and
    SOAP then gets at least as long as it took, so even a SOAP run cut by its timeout has had AdamW's
    whole time to reach AdamW's loss; the sweep's other runs take what is left."""
    records: dict[str, list[dict[str, Any]]] = {}
    timed_out: dict[str, bool] = {}
    first_s = 0.0
    for i, name in enumerate(order):
        left = min(ctx.part_left("c"), ctx.clock.left()) - PLOTS_S
        remaining = len(order) - i
        share = left if remaining == 1 else left / remaining + 10.0
        if name == SOAP_RUN:
            share = max(share, first_s + 10.0)
        timeout = min(left, max(share, MIN_CMD_S))
        if timeout < MIN_CMD_S:
            ctx.summary.note("c", f"{name}: skipped, no time left")
            continue
        run_dir = ctx.scratch / name
        res = ctx.pretrain(name, RACE, run_dir, sets + runs[name], timeout)
        first_s = first_s or res["seconds"]
        records[name] = read_metrics(run_dir / "metrics.jsonl")
        timed_out[name] = res["timed_out"]
        ctx.keep_run(name, run_dir)
    return records, timed_out


def _best_adamw(
    records: dict[str, list[dict[str, Any]]],
    timed_out: dict[str, bool],
    lrs: dict[str, float],
    steps: int,
) -> tuple[str | None, list[dict[str, Any]]]:
    """The AdamW run with the lowest final held-out loss among those that finished (else the config's
    lr, if it has one), and one row per run of the sweep."""
    rows = []
    for name, lr in lrs.items():
        points = evals(records.get(name, []))
        last = points[-1] if points else None
        done = last is not None and last[0] == steps and not timed_out.get(name, True)
        rows.append(
            {
                "run": name,
                "lr": lr,
                "final_eval": last[1] if last else None,
                "last_eval_step": last[0] if last else None,
                "finished": done,
                "time_s": elapsed_at(records[name], last[0]) if last else None,
            }
        )
    finished = [r for r in rows if r["finished"]]
    if finished:
        return min(finished, key=lambda r: r["final_eval"])["run"], rows
    first = next(iter(lrs))
    return (first if rows and rows[0]["final_eval"] is not None else None), rows


def _plots(ctx: Ctx, records: dict[str, list[dict[str, Any]]], lrs: dict[str, float]) -> None:
    """Loss against time and against step: SOAP and every AdamW run that logged a loss."""
    names = [n for n in [SOAP_RUN, *lrs] if any("loss" in x for x in records.get(n, []))]
    if SOAP_RUN not in names or len(names) < 2:
        return
    labels = ["SOAP" if n == SOAP_RUN else f"AdamW lr {lrs[n]:g}" for n in names]
    for x, png in (("time", "race_loss_vs_time.png"), ("step", "race_loss_vs_step.png")):
        if ctx.clock.left() + RESERVE_S <= 10:
            return
        res = ctx.runner.run(
            f"c9_compare_{x}",
            [sys.executable, COMPARE, *[ctx.scratch / n for n in names], "--names", *labels, "--x", x]
            + ["--title", f"gpu-race: SOAP vs AdamW, loss vs {x}", "--out", ctx.out / png],
            30.0,
        )
        if res["rc"] != 0:
            ctx.summary.note("c", f"compare_runs --x {x} failed (rc {res['rc']}); see {res['log']}")


def _race_verdicts(
    ctx: Ctx,
    adamw: list[dict[str, Any]],
    soap: list[dict[str, Any]],
    timed_out: dict[str, bool],
    steps: int,
) -> None:
    """The race's two rows (time to AdamW's loss, optimizer share) and its numbers and notes."""
    s = ctx.summary
    a_evals, s_evals = evals(adamw), evals(soap)
    a_last = max((r["step"] for r in adamw if "loss" in r), default=0)
    s_last = max((r["step"] for r in soap if "loss" in r), default=0)
    numbers: dict[str, Any] = {
        "steps": steps,
        "adamw_last_step": a_last,
        "soap_last_step": s_last,
        "adamw_evals": a_evals,
        "soap_evals": s_evals,
    }
    if not a_evals or not s_evals:
        s.skipped("c", WHAT_TIME, f"<= {RACE_TIME_RATIO}x", "a run has no held-out loss (see notes)")
    else:
        a_step, a_loss = a_evals[-1]
        a_time = elapsed_at(adamw, a_step)
        hit = next(((st, v) for st, v in s_evals if v <= a_loss), None)
        partial = [n for n, t in timed_out.items() if t]
        note = f"AdamW (best lr): {a_loss:.4f} at step {a_step}, {a_time:.1f} s in the loop"
        if partial:
            note += f"; cut by its timeout: {', '.join(partial)}"
        if hit is not None:
            s_time = elapsed_at(soap, hit[0])
            ratio = None if s_time is None or not a_time else s_time / a_time
            note += f"; SOAP: {hit[1]:.4f} at step {hit[0]}, {s_time:.1f} s (first held-out point at/below)"
            s.check("c", WHAT_TIME, f"<= {RACE_TIME_RATIO}x", ratio, RACE_TIME_RATIO, note=note)
        else:
            s_time = max((r["elapsed_s"] for r in soap if "loss" in r), default=0.0)
            note += f"; SOAP never reached it (best {min(v for _, v in s_evals):.4f} in {s_time:.1f} s)"
            if s_last >= a_step:  # the race's steps run, and not there: lost, whatever the clock says
                row = {"part": "c", "what": WHAT_TIME, "target": f"<= {RACE_TIME_RATIO}x", "value": None}
                measured = f"not reached in {s_last} steps"
                s.rows.append(row | {"measured": measured, "verdict": "FAIL", "note": note})
            else:
                note += f"; SOAP's run stopped at step {s_last}, before AdamW's {a_step}"
                s.check("c", WHAT_TIME, f"<= {RACE_TIME_RATIO}x", None, RACE_TIME_RATIO, note=note)
        numbers["adamw_final_eval"], numbers["adamw_time_s"] = a_loss, a_time
    _share_verdict(ctx, adamw, soap, numbers)
    s.numbers["c"] = numbers
    s.note(
        "c",
        "time = elapsed_s of metrics.jsonl (seconds in the training loop: start-up excluded, held-out "
        "evaluations included alike in both runs), interpolated at SOAP's first held-out point at or "
        "below the best AdamW run's final held-out loss",
    )


def _share_verdict(
    ctx: Ctx, adamw: list[dict[str, Any]], soap: list[dict[str, Any]], numbers: dict[str, Any]
) -> None:
    """The optimizer's share of SOAP's step, from the two runs' mean step times."""
    s = ctx.summary
    t_a, n_a = mean_step(adamw, 10 if not ctx.smoke else 2)
    t_s, n_s = mean_step(soap, 10 if not ctx.smoke else 2)
    numbers.update(adamw_step_s=t_a, soap_step_s=t_s)
    if t_a is None or t_s is None:
        s.skipped("c", WHAT_SHARE, f"<= {OPTIMIZER_SHARE:.0%}", "a run has too few step times")
        return
    s.check(
        "c",
        WHAT_SHARE,
        f"<= {OPTIMIZER_SHARE:.0%}",
        (t_s - t_a) / t_s,
        OPTIMIZER_SHARE,
        "{:.1%}",
        note=f"(SOAP step - AdamW step) / SOAP step: {_ms(t_s)} vs {_ms(t_a)} ({n_s}, {n_a} steps)",
    )
    s.note(
        "c",
        "optimizer share: the metrics record no optimizer time, so it is measured as the difference "
        "of the two runs' mean step times (the same model, batch and data; intervals holding an "
        "evaluation and the first 10 steps left out) over SOAP's; AdamW's own fused step (~32M "
        "parameters, well under 1 ms) is not added back, so this slightly understates SOAP's share",
    )
