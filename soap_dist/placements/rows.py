"""The gather -> step -> scatter runner shared by placements owner and zero.

Both run the engine on *home rows*: the rows of each parameter that one rank updates (a whole
matrix under owner, whole row blocks under zero). Rows held elsewhere (FSDP2 shards, ZeRO's flat
slices) send their gradient home before the step; after it, the home sends back each row's update,
which the holder applies with the one-process rule (values never travel). The runners only say which
runs of elements go where; this class moves them, one all_to_all per dtype in an order every rank
derives alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..comm import Exchange
from ..engine import Hyper, apply_update
from ..engine.step import lerp_form
from ..layout import ParamLayout

Tensor = torch.Tensor
Runs = dict[int, list[Tensor]]  # peer rank -> views to send to it (or to fill from it), in order


class HomeRowsRunner:
    """Home buffers, the engine that steps them, and the moves to and from the ranks holding rows."""

    exchange: Exchange
    engine: object
    home_grads: list[Tensor | None]
    world: int

    @staticmethod
    def new_runs(world: int) -> tuple[Runs, Runs]:
        return {r: [] for r in range(world)}, {r: [] for r in range(world)}

    def move(
        self,
        outgoing: Runs,
        incoming: Runs,
        dtypes: Sequence[torch.dtype] | None = None,
        over: tuple[Any, list[int]] | None = None,
    ) -> None:
        """Send ``outgoing[d]`` to every rank d and fill ``incoming[s]`` from every rank s.

        ``dtypes`` must be the same on every rank (default: the home gradients' dtypes, which every
        rank knows). A run of another dtype is an error, never a silent mismatch of the collectives.
        ``over``: (process group, its global ranks), peers numbered by their place in it, when not
        the exchange's shard group of ``self.world`` ranks.
        """
        peers = len(over[1]) if over is not None else self.world
        if dtypes is None:
            dtypes = sorted({g.dtype for g in self.home_grads if g is not None}, key=str)
            stray = {t.dtype for ts in outgoing.values() for t in ts} - set(dtypes)
            if stray:
                raise RuntimeError(
                    f"SOAP: a gradient has dtype {stray.pop()}, unlike every parameter; cast the gradients "
                    "to their parameters' dtype before step()"
                )
        device = self.exchange.device
        for dtype in dtypes:
            send_parts = [t for d in range(peers) for t in outgoing[d] if t.dtype == dtype]
            send_counts = [sum(t.numel() for t in outgoing[d] if t.dtype == dtype) for d in range(peers)]
            recv_counts = [sum(t.numel() for t in incoming[s] if t.dtype == dtype) for s in range(peers)]
            send = torch.cat(send_parts) if send_parts else torch.empty(0, dtype=dtype, device=device)
            received = self.exchange.swap_pieces(send, send_counts, recv_counts, over)
            at = 0
            for s in range(peers):
                for t in incoming[s]:
                    if t.dtype == dtype:
                        t.copy_(received[at : at + t.numel()])
                        at += t.numel()


def apply_updates(
    groups: list[dict], layouts: Sequence[ParamLayout], pieces: Iterable[tuple[int, Tensor, Tensor]]
) -> None:
    """Apply (parameter, rows of its values, their update) with the one-process rule
    (``engine.apply_update``), one batch per param group and dtype pair: element by element the
    same arithmetic as the home would do on the whole."""
    batches: dict[tuple[int, torch.dtype, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for i, target, update in pieces:
        targets, updates = batches.setdefault((layouts[i].group, target.dtype, update.dtype), ([], []))
        targets.append(target)
        updates.append(update)
    for (group, _, _), (targets, updates) in batches.items():
        hyper = Hyper.of(groups[group])
        apply_update(targets, updates, hyper.lr * hyper.weight_decay, lerp_form(hyper))
