"""End a distributed launcher's process without the interpreter's finalization.

A rank that had finished its run (results written, process groups destroyed) now and then aborted
in the interpreter's teardown: "terminate called without an active exception", SIGABRT, with no
Python frame left on the stack (faulthandler's dump), so after the atexit handlers, in the
finalization. torchrun then reported the finished run as failed (exit 1). Measured: 2 of 27
four-rank gloo runs of launchers/pretrain.py beside two busy loops on 2 cores, none of 60 with
``finish``. The known cause is a C++ thread of the process group reaching for the GIL while the
interpreter shuts down (pytorch/pytorch#179291, closed without a fix). ``finish`` does what the
teardown does that matters (waits for non-daemon threads, runs the atexit handlers: logging's, an
experiment tracker's; flushes Python's and C's buffered output) and leaves with ``os._exit``.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def finish(code: int) -> NoReturn:
    """Exit with ``code``: through ``os._exit`` after the steps above when several processes run this
    job (WORLD_SIZE > 1: torchrun, accelerate launch, the DeepSpeed launcher), else as ``sys.exit``."""
    if int(os.environ.get("WORLD_SIZE") or 1) <= 1:
        raise SystemExit(code)
    # the interpreter's shutdown, first step: wakes idle thread pools (an executor still referenced,
    # as torch.compile's on CPU, would wait forever in a plain join), then joins non-daemon threads
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()  # (logging.shutdown among them)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # (None when the descriptor was closed at start-up)
                stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # what native code wrote through C's stdio
    except (OSError, AttributeError):  # pragma: no cover - a libc without it
        pass
    os._exit(code)


def finish_as(stop: SystemExit) -> NoReturn:
    """``finish`` with what the interpreter makes of ``stop``: its code, 0 for None, and for a
    message the message on stderr and 1."""
    if isinstance(stop.code, int) or stop.code is None:
        finish(stop.code or 0)
    print(stop.code, file=sys.stderr)
    finish(1)


def run_and_finish(main: Callable[[], object]) -> NoReturn:
    """A launcher's ``main``, then ``finish`` with its exit code: the int it returns (0 for anything
    else, e.g. fine-tuning's metric rows), or the SystemExit it raises (bad input 2, an interrupt 130
    or 143), so that no way out goes through the teardown."""
    try:
        code = main()
    except SystemExit as stop:
        finish_as(stop)
    finish(code if isinstance(code, int) else 0)
