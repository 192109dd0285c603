"""What the suite runs against and measures for: paths, the issue's targets, time budgets, smoke sizes.

Kept apart so that every part reads the same numbers, and the summary's targets are edited in one place.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
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
# Part r runs its GPU tests first (up to gpu_tests_cmd), then the refresh bench in what is left.
GPU_PLAN = {
    "r": 115.0,
    "gpu_tests_cmd": 60.0,
    "a": 130.0,
    "b": 120.0,
    "refresh_cmd": 60.0,
    "bench_cmd": 75.0,
    "train_cmd": 60.0,
    "calibrate_cmd": 45.0,
}
SMOKE_PLAN = {
    "r": 30.0,
    "gpu_tests_cmd": 30.0,
    "a": 40.0,
    "b": 40.0,
    "refresh_cmd": 30.0,
    "bench_cmd": 30.0,
    "train_cmd": 30.0,
    "calibrate_cmd": 30.0,
}
RESERVE_S = 12.0  # kept back for the comparison plots, the summary and the archive
MIN_CMD_S = 20.0  # a command given less than this is not started
PER_GPU_TEST_S = 40.0  # one GPU test's limit (pytest-timeout): a hang names its test, the rest run
B_STEPS, B_DROP = 40, 10  # part b: steps per run, and the first steps left out of the mean
CALIBRATE_STEPS = 20
# Part c's AdamW learning-rate sweep (the brief: AdamW at its best lr of at least three): the config's
# lr times each factor. It runs when all four runs fit at SWEEP_MIN_STEPS steps (or the config's).
ADAMW_LR_FACTORS = (1.0, 0.5, 2.0)  # the first is the run the race falls back on without the sweep
SWEEP_MIN_STEPS = 200

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
