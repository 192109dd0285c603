"""Where an asynchronous refresh runs: its own CUDA stream, joined before the state is touched again.

With ``refresh_delay >= 1`` a refreshed basis is not used before a later step, so the refresh of
step t (statistics reduce and decompositions) can run beside the forward and backward of step t + 1;
its basis broadcasts start when the next ``step()`` joins it (engine.async_refresh). ``launch`` puts
that work on a side stream after everything the step queued so far; ``join`` makes the caller's
stream wait for it. Both are GPU-side waits: the host never blocks, so nothing depends on timing. On
a CPU the same code runs inline (no stream).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class RefreshStream:
    """A side stream for the refresh on CUDA; a no-op elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.busy = False  # work was launched and not yet joined

    @contextmanager
    def launch(self) -> Iterator[None]:
        """Run the body's kernels (and NCCL calls) on the side stream, after the step's own work."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            self.busy = True  # whatever was queued, even by a body that raised, is joined next

    def join(self) -> None:
        """The current stream waits for the launched refresh before it reads or writes the state."""
        if self.stream is not None and self.busy:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self.busy = False

    def mark(self) -> torch.cuda.Event | None:
        """A timing event recorded on the current stream (the side stream inside ``launch``); None
        off CUDA. Two marks time the side stream's work on the GPU, not the host's launch of it."""
        if self.stream is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def to_host(self, t: torch.Tensor) -> HostCopy:
        """A copy of ``t`` for the host to read later, started now without waiting (pinned memory)."""
        if self.stream is None:
            return HostCopy(t.clone(), None)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()  # on the current stream: the side stream inside launch, else the step's
        return HostCopy(host, event)


class HostCopy:
    """A device tensor's values on their way to the host; ``tolist`` waits only for that copy."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None) -> None:
        self.host = host
        self.event = event

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
