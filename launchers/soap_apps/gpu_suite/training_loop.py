"""Part b: a real gpt2-small training loop, refresh on and off, compared by mean step time."""

from __future__ import annotations

import statistics

from soap_apps.gpu_suite.context import Ctx
from soap_apps.gpu_suite.results import mean_step, per_step_seconds, read_metrics
from soap_apps.gpu_suite.settings import (
    B_DROP,
    B_STEPS,
    GPT2_SMALL,
    LOOP_OVER_NO_REFRESH,
    SMOKE_B_DROP,
    SMOKE_B_STEPS,
    SMOKE_MODEL,
)
from soap_apps.gpu_suite.summary import format_seconds as _ms


def part_b(ctx: Ctx) -> None:
    """gpt2-small in one process, refresh on then off; the mean step of the first over the second's."""
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
