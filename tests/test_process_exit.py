"""soap_apps.process_exit: a distributed launcher leaves through os._exit, after what the teardown
does that matters (threads joined, atexit handlers run, Python's and C's output flushed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pretrain_helpers import REPO

SCRIPT = """
import atexit, ctypes, sys, threading, time
from soap_apps.process_exit import finish, finish_as
atexit.register(lambda: print(" atexit", end=""))
ctypes.CDLL(None).printf(b" C-level ")  # buffered by C's stdio: lost unless flushed
sys.stdout.flush()  # (C's buffer is separate: it still holds its text)
threading.Thread(target=lambda: (time.sleep(0.5), print(" thread", end=""))).start()
import concurrent.futures
POOL = concurrent.futures.ThreadPoolExecutor(1)  # kept: its idle worker waits until the shutdown wakes it
POOL.submit(lambda: None).result()
print(" last words", end="")  # no newline: lost unless flushed (stdout is a pipe here)
print("a warning", end="", file=sys.stderr)
if sys.argv[1] == "code":
    finish(3)
finish_as(SystemExit(sys.argv[1]))
"""


def _run(world: str, arg: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORLD_SIZE": world, "PYTHONPATH": str(REPO / "launchers")}
    env.pop("PYTHONUNBUFFERED", None)
    return subprocess.run(  # (a join that waits for the idle pool would run into the timeout)
        [sys.executable, "-c", SCRIPT, arg], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("world", ["1", "2"])
def test_finish_waits_flushes_and_runs_atexit_at_any_world(world):
    proc = _run(world, "code")
    assert proc.returncode == 3
    assert proc.stderr == "a warning"
    assert sorted(proc.stdout.split()) == sorted("C-level thread last words atexit".split()), proc.stdout


def test_finish_as_exits_as_the_interpreter_would():
    proc = _run("2", "stopped: see above")  # SystemExit("...") prints its message and exits 1
    assert proc.returncode == 1 and proc.stderr == "a warningstopped: see above\n", proc.stderr


def test_finish_with_stdout_closed_still_exits_with_its_code():
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(REPO / "launchers")}
    script = "from soap_apps.process_exit import finish; finish(3)"
    command = f"{sys.executable} -c '{script}' >&-"
    proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and proc.stderr == "", proc.stderr


def test_run_and_finish_exits_with_what_main_returns_or_raises(monkeypatch):
    from soap_apps.process_exit import run_and_finish

    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: finish is sys.exit, seen here as SystemExit

    def refused() -> None:
        raise SystemExit(2)

    for main, code in ((lambda: 5, 5), (lambda: [{"step": 1}], 0), (refused, 2)):
        with pytest.raises(SystemExit) as stop:
            run_and_finish(main)
        assert stop.value.code == code
