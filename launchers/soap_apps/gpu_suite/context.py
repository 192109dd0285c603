"""What a part is handed: the output folders, the clock and each part's own deadline, the runner
and the summary, and the two things several parts do (start a pre-training run, keep its small files).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from soap_apps.gpu_suite.running import Clock, Runner
from soap_apps.gpu_suite.settings import GPU_PLAN, MIN_CMD_S, PRETRAIN, SMOKE_PLAN
from soap_apps.gpu_suite.summary import Summary


class Ctx:
    """The state every part shares, and the deadline of the part running now."""

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
        """Start ``part``'s clock: its own budget, cut to the suite's deadline (the race has none)."""
        budget = self.plan.get(part)
        end = self.clock.end if budget is None else min(self.clock.end, time.monotonic() + budget)
        self.part_end[part] = end

    def part_left(self, part: str) -> float:
        return self.part_end[part] - time.monotonic()

    def cmd_timeout(self, part: str, kind: str) -> float | None:
        """A command's timeout: its kind's limit within the part's time; None when too little is left."""
        t = min(self.plan[kind], self.part_left(part))
        return t if t >= MIN_CMD_S else None

    def pretrain(
        self, name: str, config: Path, run_dir: Path, sets: list[str], timeout: float
    ) -> dict[str, Any]:
        """launchers/pretrain.py on ``config`` into ``run_dir``, each of ``sets`` as a --set override."""
        cmd = [sys.executable, PRETRAIN, "--config", config, "--out", run_dir]
        for item in sets:
            cmd += ["--set", item]
        return self.runner.run(name, cmd, timeout)

    def keep_run(self, name: str, run_dir: Path) -> None:
        """The run's small files into raw/ (checkpoints and the export stay behind)."""
        for f in ("metrics.jsonl", "config.yaml", "loss.png"):
            if (run_dir / f).is_file():
                shutil.copy(run_dir / f, self.raw / f"{name}.{f}")
