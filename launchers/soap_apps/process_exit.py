"""End a distributed launcher's process without the interpreter's teardown.

A rank that had finished its run (results written, process groups destroyed) now and then aborted
in the interpreter's teardown: "terminate called without an active exception", SIGABRT, with no
Python frame left on the stack (faulthandler's dump). torchrun then reported the finished run as
failed (exit 1). Measured: 2 of 27 four-rank gloo runs of launchers/pretrain.py beside two busy
loops on 2 cores. The known cause is a C++ thread of the process group reaching for the GIL while
the interpreter shuts down (pytorch/pytorch#179291, closed without a fix). By then every file of the
run is closed, so what the teardown does that matters is flushing the standard streams and logging:
``finish`` does that and leaves with ``os._exit``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def finish(code: int) -> NoReturn:
    """Exit with ``code``: through ``os._exit`` (after flushing) when several processes run this job
    (WORLD_SIZE > 1: torchrun, accelerate launch, the DeepSpeed launcher), else as ``sys.exit``."""
    if int(os.environ.get("WORLD_SIZE") or 1) <= 1:
        raise SystemExit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(code)
