"""soap_apps.process_exit.finish: a distributed launcher leaves through os._exit, its output flushed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pretrain_helpers import REPO

SCRIPT = """
import atexit, sys
from soap_apps.process_exit import finish
atexit.register(lambda: print("teardown ran"))
print("last words", end="")  # no newline: lost unless flushed (stdout is a pipe here)
print(" and a warning", end="", file=sys.stderr)
finish(3)
"""


@pytest.mark.parametrize("world", ["1", "2"])
def test_finish_flushes_and_skips_the_teardown_only_with_several_processes(world):
    env = {**os.environ, "WORLD_SIZE": world, "PYTHONPATH": str(REPO / "launchers")}
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stderr == " and a warning"
    # one process: the interpreter's teardown (atexit) runs as usual; several: it is skipped
    assert proc.stdout == ("last words" if world == "2" else "last wordsteardown ran\n")
