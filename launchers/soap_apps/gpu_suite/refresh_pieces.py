"""Part r: where a refresh's time goes, per piece and per factor size of the gpt2-medium set; then
the GPU-marked tests of the refresh (the tensor-core QR's accuracy, the side-stream refresh's results)."""

from __future__ import annotations

import json
import sys

from soap_apps.gpu_suite.context import Ctx
from soap_apps.gpu_suite.settings import MIN_CMD_S

GPU_TESTS = ["tests/test_qr.py", "tests/test_async_refresh.py", "tests/test_gpu.py"]


def part_r(ctx: Ctx) -> None:
    """Where a refresh's time goes (soap_dist.bench.refresh_parts): per piece, per factor size."""
    s = ctx.summary
    timeout = ctx.cmd_timeout("r", "refresh_cmd")  # shorter than part a's: the GPU tests need the rest
    if timeout is None:
        s.note("r", "refresh pieces: skipped, no time left in the part's budget")
        return
    js = ctx.raw / "r_refresh_parts.json"
    extra = ["--sizes", "64,96", "--max-batch", "2", "--repeats", "1"] if ctx.smoke else []
    cmd = [sys.executable, "-m", "soap_dist.bench.refresh_parts", "--model", "gpt2-medium", "--json", js]
    r = ctx.runner.run("r_refresh_parts", cmd + extra, timeout)
    if not js.is_file():
        s.note("r", f"refresh pieces: no JSON (rc {r['rc']}); see {r['log']}")
        return
    numbers = json.loads(js.read_text())
    s.numbers["r"] = numbers
    if not ctx.smoke:
        _gpu_tests(ctx)
    for name, seconds in numbers["totals_s"].items():
        s.check(
            "r",
            f"gpt2-medium full refresh from the pieces, {name}",
            "(information)",
            seconds,
            None,
            "{:.3f} s",
            "sum over the factor set of the per-factor time of one chunk",
        )
    s.note("r", f"the per-piece table is in raw/{r['log']}")


def _gpu_tests(ctx: Ctx) -> None:
    s = ctx.summary
    left = ctx.part_left("r")
    if left < MIN_CMD_S:
        s.note("r", "GPU tests: skipped, no time left in the part's budget")
        return
    t = ctx.runner.run("r_gpu_tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", *GPU_TESTS], left)
    what = "GPU tests: QR, async refresh, host syncs, NCCL waits (pytest -m gpu), failed runs"
    if t["timed_out"]:  # not a failure: the tests ran out of the part's time (the log says how far)
        note = f"timed out after {t['seconds']:.0f} s, not a test failure; log raw/{t['log']}"
        s.check("r", what, "0", None, 0, "{}", note)
        return
    s.check("r", what, "0", int(t["rc"] != 0), 0, "{}", f"rc {t['rc']}; log raw/{t['log']}")
