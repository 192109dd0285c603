"""The exchange of a one-rank grid: the engine's one refresh path, with nothing to move.

``comm.Exchange`` is the same interface across ranks; with one rank every factor is owned and used
here, so the statistics need no reduce and the bases no broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..plan import FactorEntry

Tensor = torch.Tensor
Result = tuple[Tensor, Tensor, Tensor]


class LocalFlight:
    """Bases 'in flight' to this rank alone: already here."""

    def __init__(self, own: dict[FactorEntry, Result]) -> None:
        self.own = own

    def wait(self) -> dict[FactorEntry, Result]:
        return dict(self.own)


class LocalExchange:
    """``comm.Exchange`` for one process: every call returns at once and moves nothing."""

    step = 0  # the optimizer step, for messages (kept alike with comm.Exchange)

    def collectives_begun(self) -> int:
        return 0

    def tell_peers(self, step: int, error: str) -> None:
        """No peers to tell."""

    def all_finite(self, flags: Tensor, words: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return flags, None

    def reduce_to_owners(
        self, entries: Sequence[FactorEntry], partial: Callable[[FactorEntry], Tensor | None]
    ) -> dict[FactorEntry, Tensor]:
        return {}

    def broadcast_bases(
        self, entries: Sequence[FactorEntry], results: dict[FactorEntry, Result]
    ) -> LocalFlight:
        return LocalFlight(results)
