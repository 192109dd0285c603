"""The SOAP engine: batched storage (engine.core), the step (engine.step), the one refresh path and
the installs (engine.refresh), and the exchange of a one-rank grid (engine.local)."""

from .core import INSTALLED_AT_KEPT, Counters, Hyper, SoapEngine, apply_update
from .refresh import REFRESH_CHUNK_BYTES

__all__ = ["INSTALLED_AT_KEPT", "REFRESH_CHUNK_BYTES", "Counters", "Hyper", "SoapEngine", "apply_update"]
