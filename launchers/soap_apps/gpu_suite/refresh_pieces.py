"""Part r: where a refresh's time goes, per piece and per factor size of the gpt2-medium set; then
the GPU-marked tests of the refresh (the tensor-core QR's accuracy, the side-stream refresh's results)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from soap_apps.gpu_suite.context import Ctx
from soap_apps.gpu_suite.settings import PER_GPU_TEST_S

GPU_TESTS = ["tests/test_qr.py", "tests/test_async_refresh.py", "tests/test_gpu.py"]


def part_r(ctx: Ctx) -> None:
    """The GPU tests first (they are the verdict; the bench is information), then where a refresh's
    time goes (soap_dist.bench.refresh_parts): per piece, per factor size."""
    if not ctx.smoke:
        _gpu_tests(ctx)
    s = ctx.summary
    timeout = ctx.cmd_timeout("r", "refresh_cmd")
    if timeout is None:
        s.note("r", "refresh pieces: skipped, no time left in the part's budget")
        return
    js = ctx.raw / "r_refresh_parts.json"
    extra = ["--sizes", "64,96", "--max-batch", "2", "--repeats", "1"] if ctx.smoke else []
    cmd = [sys.executable, "-m", "soap_dist.bench.refresh_parts", "--model", "gpt2-medium", "--json", js]
    r = ctx.runner.run("r_refresh_parts", cmd + extra, timeout)
    try:  # written after each factor size: a bench cut short still leaves the sizes it measured
        numbers = json.loads(js.read_text())
    except (OSError, ValueError) as error:
        s.note("r", f"refresh pieces: no JSON (rc {r['rc']}, {type(error).__name__}); see raw/{r['log']}")
        return
    s.numbers["r"] = numbers
    partial = "" if numbers.get("complete", True) else f" (only sizes {numbers['sizes']}: cut short)"
    for name, seconds in numbers["totals_s"].items():
        s.check(
            "r",
            f"gpt2-medium full refresh from the pieces, {name}{partial}",
            "(information)",
            seconds,
            None,
            "{:.3f} s",
            "sum over the factor set of the per-factor time of one chunk",
        )
    s.note("r", f"the per-piece table is in raw/{r['log']}")


def _gpu_tests(ctx: Ctx) -> None:
    """pytest -m gpu, verbose (each test's name, outcome and duration in the log), each test under a
    timeout where pytest-timeout is installed (the GPU image has it), so one hang names itself."""
    s = ctx.summary
    what = "GPU tests: QR, async refresh, host syncs, NCCL waits (pytest -m gpu), failed runs"
    timeout = ctx.cmd_timeout("r", "gpu_tests_cmd")
    if timeout is None:
        s.check("r", what, "0", None, 0, "{}", "skipped: no time left in the part's budget")
        return
    # -u: each test's name reaches the log as it starts, so a run cut off names the test it was in
    cmd = [sys.executable, "-u", "-m", "pytest", "-o", "addopts=", "-v", "-rA", "--durations=0", "-m", "gpu"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={PER_GPU_TEST_S:.0f}"]
    t = ctx.runner.run("r_gpu_tests", cmd + GPU_TESTS, timeout)
    if t["timed_out"]:  # the tests ran out of the part's time: say how far they got, and in which test
        failed, running = _cut_off_at(ctx.raw / t["log"])
        note = f"timed out after {t['seconds']:.0f} s" + (
            f" in {running} (hung, or slower than the time left)" if running else ""
        )
        s.check("r", what, "0", failed or None, 0, "{}", f"{note}; log raw/{t['log']}")
        return
    s.check("r", what, "0", int(t["rc"] != 0), 0, "{}", f"rc {t['rc']}; log raw/{t['log']}")


OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")


def _cut_off_at(log: Path) -> tuple[int, str | None]:
    """From a ``pytest -v`` log that was cut off: the tests failed so far, and the test it was in (a
    line naming a test with no outcome yet), if any."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return 0, None
    tests = [line for line in lines if line.startswith("tests/") and "::" in line]
    failed = sum(any(o in line for o in ("FAILED", "ERROR")) for line in tests)
    last = tests[-1] if tests else ""
    running = last.split()[0] if last and not any(o in last for o in OUTCOMES) else None
    return failed, running
