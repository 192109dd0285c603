"""Running the suite's commands under a deadline: each with a timeout, its output in a log file.

A command that outlives its timeout is ended with its whole process group (compile workers
included), so that a stuck part cannot eat the time of the parts after it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from soap_apps.gpu_suite.settings import REPO, RESERVE_S


def log(msg: str) -> None:
    """A timestamped progress line (the device tool shows the tail of stdout)."""
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
        shown = shlex.join(str(c) for c in cmd).replace(str(REPO) + "/", "")  # pastes back into a shell
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
            except BaseException:  # Ctrl-C or SIGTERM: the command, in its own session, must end too
                _end_group(proc)
                raise
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
