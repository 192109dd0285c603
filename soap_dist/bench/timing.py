"""Timing and memory measurement of one optimizer, with the synchronisation that makes GPU times honest."""

from __future__ import annotations

import ctypes
import math
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Result:
    """One optimizer's measurements; steps are (t, seconds, is_refresh) for the timed steps only."""

    name: str
    init_s: float
    steps: list[tuple[int, float, bool]]
    peak_bytes: int
    extra_bytes: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        plain = [s for _, s, r in self.steps if not r]
        return statistics.median(plain) if plain else math.nan

    @property
    def refresh(self) -> float | None:
        ref = [s for _, s, r in self.steps if r]
        return statistics.median(ref) if ref else None

    def amortized(self, k: int) -> float:
        """((k-1) * median + refresh) / k: the spec's amortized step (the median when nothing refreshes)."""
        ref = self.refresh
        return self.median if ref is None else ((k - 1) * self.median + ref) / k

    def cycle_mean(self, k: int) -> float | None:
        """Mean over the last complete cycle t = jk+1 .. (j+1)k inside the timed steps, if there is one.

        Unlike ``amortized`` it also catches refresh work that an optimizer spreads over other steps.
        """
        by_t = {t: s for t, s, _ in self.steps}
        ends = [t for t in by_t if t % k == 0 and all(u in by_t for u in range(t - k + 1, t + 1))]
        if not ends:
            return None
        end = max(ends)
        return sum(by_t[u] for u in range(end - k + 1, end + 1)) / k

    @property
    def worst(self) -> float:
        return max(s for _, s, _ in self.steps)

    @property
    def all_median(self) -> float:
        """The median over every timed step, refreshes included: under a staggered schedule every
        step carries some refresh work, and ``median`` (refresh steps left out) hides it."""
        return statistics.median(s for _, s, _ in self.steps)

    @property
    def mean(self) -> float:
        return statistics.fmean(s for _, s, _ in self.steps)

    def as_dict(self, k: int) -> dict[str, Any]:
        return {
            "name": self.name,
            "init_s": self.init_s,
            "median_s": self.median,
            "refresh_s": self.refresh,
            "amortized_s": self.amortized(k),
            "cycle_mean_s": self.cycle_mean(k),
            "worst_s": self.worst,
            "all_median_s": self.all_median,
            "mean_s": self.mean,
            "peak_bytes": self.peak_bytes,
            "extra_bytes": self.extra_bytes,
            "steps": self.steps,
            **self.extras,
        }


def _read_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; Linux only, may be forbidden."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_host_memory() -> None:
    """Give freed heap pages back to the OS so the next phase's RSS starts from what is really in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak memory of one phase: CUDA allocator peak on GPU; on CPU the best RSS measure available."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated (reset per optimizer)"
        elif _read_status_kb("VmHWM") is not None and _reset_peak_rss():
            self.method = "peak RSS (VmHWM, reset per optimizer via /proc/self/clear_refs)"
        else:
            try:
                import psutil  # noqa: F401

                self.method = "psutil RSS sampled after each step (misses transients)"
            except ImportError:
                self.method = "growth of ru_maxrss (0 when below an earlier optimizer's peak)"
        self.baseline = self.peak = 0

    def _rss(self) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        elif self.method.startswith("peak RSS"):
            release_host_memory()
            self.baseline = (_read_status_kb("VmRSS") or 0) * 1024
            _reset_peak_rss()
        elif self.method.startswith("psutil"):
            self.baseline = self.peak = self._rss()
        else:
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def sample(self) -> None:
        if self.method.startswith("psutil"):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> tuple[int, int]:
        """(peak bytes, peak bytes above the start of the phase)."""
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        elif self.method.startswith("peak RSS"):
            self.peak = (_read_status_kb("VmHWM") or 0) * 1024
        elif not self.method.startswith("psutil"):
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.peak, max(0, self.peak - self.baseline)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_optimizer(
    name: str,
    make: Callable[[], Any],
    params: Sequence[Tensor],
    n_steps: int,
    warmup: int,
    k: int,
    refreshes: bool,
    probe: MemoryProbe,
    gen: torch.Generator,
    log: Callable[[str], None],
) -> Result:
    """Run the first call (init) and n_steps more, each with fresh random gradients, timing each one.

    Steps t <= warmup run but are not kept; a kept step is a refresh when the optimizer refreshes and k | t.
    """
    device = params[0].device

    def fresh_grads() -> None:
        for p in params:
            p.grad.normal_(generator=gen)

    def timed_step(opt: Any) -> float:
        fresh_grads()
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        dt = time.perf_counter() - t0
        probe.sample()
        return dt

    probe.start()
    opt = make()
    init = timed_step(opt)
    log(f"[{name}] first call (init{', eigh' if refreshes else ''}): {init:.4f} s")
    steps: list[tuple[int, float, bool]] = []
    for t in range(1, n_steps + 1):
        dt = timed_step(opt)
        is_ref = refreshes and t % k == 0
        kept = t > warmup
        if kept:
            steps.append((t, dt, is_ref))
        log(f"[{name}] step t={t}: {dt:.4f} s{' (refresh)' if is_ref else ''}{'' if kept else ' (warmup)'}")
    peak, extra = probe.stop()
    extras: dict[str, Any] = {}
    stats = getattr(opt, "stats", None)
    if callable(stats):
        try:
            extras["opt_stats"] = {key: str(v)[:500] for key, v in dict(stats()).items()}
        except Exception as e:  # optional introspection must never break a benchmark
            extras["opt_stats_error"] = repr(e)
    del opt
    return Result(name, init, steps, peak, extra, extras)
