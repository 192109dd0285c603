"""Part c: the race, SOAP against AdamW on configs/pretrain/gpu-race.yaml, loss against wall-clock.

A short SOAP calibration run first sizes both runs to the time left; the verdicts compare SOAP's
time to AdamW's final held-out loss, and SOAP's optimizer share of the step.
"""

from __future__ import annotations

import sys
from typing import Any

from soap_apps.gpu_suite.context import Ctx
from soap_apps.gpu_suite.results import elapsed_at, evals, flat_yaml, mean_step, read_metrics
from soap_apps.gpu_suite.settings import (
    CALIBRATE_STEPS,
    COMPARE,
    MIN_CMD_S,
    OPTIMIZER_SHARE,
    RACE,
    RACE_TIME_RATIO,
    RESERVE_S,
    SMOKE_MODEL,
    SMOKE_RACE_STEPS,
)
from soap_apps.gpu_suite.summary import format_seconds as _ms


def part_c(ctx: Ctx) -> None:
    """Calibrate, race AdamW then SOAP, plot loss against time and step, then give the verdicts."""
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
    """The race's two rows (time to AdamW's loss, optimizer share) and its numbers and notes."""
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
