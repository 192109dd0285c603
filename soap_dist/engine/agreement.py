"""What the ranks agree on before a step changes anything: one all_reduce per step.

A mixin of ``SoapEngine`` (engine.core). Every rank must step the same parameters with the same
options at the same step count, skip the same non-finite gradients and start a parameter at the same
first non-zero gradient. All of it travels in one all_reduce(MIN) of per-parameter flags and a few
hash words, before any collective whose sizes depend on it (the owner's gradient gather runs after
``agree``), so that ranks that differ stop with one RanksDisagreeError naming the difference instead
of a collective of mismatched sizes. One process: the same decisions, with nothing sent.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import astuple

import torch

from .step import Agreed, Hyper

Tensor = torch.Tensor


class AgreementMixin:
    """``SoapEngine.agree`` and the checks it runs (see engine.core for the attributes)."""

    def agree(self, groups: list[dict], grads: list[Tensor | None], active: list[bool]) -> Agreed | None:
        """Start step ``calls + 1``: finish last step's refresh, then agree with the other ranks on
        this step (None: no parameter has a gradient on any rank; nothing to do).

        ``grads``: this rank's gradients (its rows under FSDP2, before any gather); ``active``: which
        parameters have one, which every rank must see the same.
        """
        self.calls += 1
        hypers = [Hyper.of(g) for g in groups]
        self.fix_phases([h.precondition_frequency for h in hypers])
        with self._refusing_after_a_raise():  # a refresh launched on the side stream last step ends now
            self.join_refresh()
        while self._inflight and self._inflight[0][0] <= self.calls:
            _, flight, ids = self._inflight.pop(0)
            self._receive(flight, ids, first=False)
        active = list(active)
        active_ids = [i for i, a in enumerate(active) if a]
        if not active_ids and self.plan.topology.world == 1:
            return None
        n = len(grads)
        finite, norms = self._finite_flags(grads, active_ids)
        fresh = [i for i in active_ids if not self.started[i]]
        unstarted = not all(self.started)  # the same on every rank: the zero-first flags ride along
        flags = torch.cat([finite, self._zero_first_flags(grads, fresh)]) if unstarted else finite
        words = self._agreement_words(hypers, active_ids, norms)
        flags, agreed = self.exchange.all_finite(flags, words)
        finite = flags[:n]
        if agreed is not None and not bool(agreed.all()):  # one small host read per step, distributed only
            # A gradient skipped as non-finite differs between replicas by nature; the decision is shared.
            if not bool(agreed[0]) or bool(finite.all()):
                self._disagree(hypers, active_ids, agreed, norms)
        self.nonfinite_seen |= ~finite  # warned at the next refresh, also for a parameter not started
        if fresh:  # a first gradient zero on every rank, or not finite on one, does not start its parameter
            # (a non-finite one is zeroed for the step: the first bases would come from a zero factor)
            index = self._index(fresh)
            unstartable = (flags[n:][index] | ~finite[index]).tolist()
            skipped = {i for i, z in zip(fresh, unstartable, strict=True) if z}
            active_ids = [i for i in active_ids if i not in skipped]
            for i in skipped:
                active[i] = False
        if not active_ids:
            return None
        return Agreed(hypers, active, active_ids, finite)

    def _zero_first_flags(self, grads: list[Tensor | None], fresh: list[int]) -> Tensor:
        """Per parameter, whether this is its first gradient (``fresh``: the unstarted ones with a
        gradient) and it is exactly zero on this rank (True elsewhere: the identity of the MIN), so
        that a parameter starts at its first gradient that is not zero everywhere.

        DeepSpeed's fp16/bf16 stage-0 wrappers and DCP call ``step`` once with all-zero gradients to
        create optimizer state; a preconditioner built from zeros would hold an arbitrary basis until
        the first refresh. This costs one host read per step, and only while a parameter is unstarted.
        """
        flags = torch.ones(len(grads), dtype=torch.bool, device=self.device)
        if fresh:
            empty = torch.ones((), dtype=torch.bool, device=self.device)  # an empty shard holds no non-zero
            zero = torch.stack([(grads[i] == 0).all() if grads[i].numel() else empty for i in fresh])
            flags[self._index(fresh)] = zero
        return flags

    def _finite_flags(self, grads: list[Tensor | None], active_ids: list[int]) -> tuple[Tensor, Tensor]:
        """One flag per parameter (its gradient's norm is finite: no NaN/Inf, no overflow, and small
        enough for the factors), and the norms."""
        if not active_ids:
            none = torch.zeros(0, device=self.device)
            return torch.ones(len(grads), dtype=torch.bool, device=self.device), none
        mine = [grads[i] for i in active_ids]
        # At least in the factors' dtype: an fp16 gradient's own norm overflows at 65504. And below
        # sqrt(max) of it: an entry of G G^T is at most ||G||^2, so a larger (float64) gradient would
        # turn the float32 factors Inf for good. A rank sees its shard only, and up to S shards' squares
        # add up in the factor a whole block or the owner forms: each shard must stay below sqrt(max / S).
        dtype = functools.reduce(torch.promote_types, {g.dtype for g in mine}, self.factor_dtype)
        norms = torch.stack(torch._foreach_norm(mine, 2, dtype=dtype))
        limit = (torch.finfo(self.factor_dtype).max / self.plan.topology.shards) ** 0.5
        flags = norms.isfinite() & (norms < limit)
        if len(active_ids) == len(grads):
            return flags, norms
        full = torch.ones(len(grads), dtype=torch.bool, device=self.device)
        full[self._index(active_ids)] = flags
        return full, norms

    def _refreshing(self, hypers: list[Hyper], active_ids: list[int]) -> list[int]:
        """Parameters whose refresh (or first bases) this step will run: the collectives ahead."""
        return [i for i in active_ids if not self.started[i] or self._due(self.steps[i] + 1, i, hypers)]

    def _agreement_words(self, hypers: list[Hyper], active_ids: list[int], norms: Tensor) -> Tensor | None:
        """What every rank must agree on at this step, as int64 words for the finite-flag all_reduce:
        a hash of the step count, the parameters with a gradient, the refreshes ahead and the
        hyperparameters; where ranks hold replicas of the same gradient rows, one fingerprint of them
        per replica slot (DDP's and HSDP's all-reduce make them bitwise equal), which only the slot's
        ranks vote on."""
        if self.plan.topology.world == 1:
            return None
        refreshing = self._refreshing(hypers, active_ids)
        text = repr((self.calls, active_ids, refreshing, [astuple(h) for h in hypers]))
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        word = int.from_bytes(digest, "little") >> 2  # torch.full: a fill kernel, not a synchronising copy
        slot = self.gradient_slot()
        if slot is None:
            return torch.full((1,), word, dtype=torch.int64, device=self.device)
        slots, mine = slot
        votes = 2 if self._repeats_updates() else 1
        words = torch.full((1 + votes * slots,), self.exchange.NO_VOTE, dtype=torch.int64, device=self.device)
        words[0] = word
        words[1 + mine : 2 + mine] = norms.double().sum().reshape(1).view(torch.int64)  # a device copy
        if votes == 2:
            words[1 + slots + mine] = int(bool(self.fused))
        return words

    def gradient_slot(self) -> tuple[int, int] | None:
        """(slots, this rank's slot) when ranks hold replicas of the same gradient rows: the ranks of
        a slot must hold bitwise equal gradients. Replicated: one slot; HSDP: one per shard; owner over
        an HSDP mesh: as the runner says (``replica_slots``); else None (no replicas to compare)."""
        topo = self.plan.topology
        return (topo.shards, topo.shard) if topo.replicas > 1 else self.replica_slots

    def _repeats_updates(self) -> bool:
        """Whether the ranks of a replica slot compute the same updates, and so must run the same
        elementwise step (``fused``): a compile that failed on some of them only turns their step
        eager, which rounds otherwise, and the replicas would drift apart. Replicated: every rank
        computes every update; HSDP: the replicas of a shard its rows'. (Under owner with
        owner_scope="world" each update is computed at one rank, and a rank that updates nothing
        never tries the compile: fused may differ there, harmlessly. With owner_scope="shard_group"
        each replica's owners repeat the same updates, but this all_reduce stays inside a shard group:
        nothing compares the replicas there, docs/design.md, section 9.)"""
        return self.plan.topology.placement in ("replicated", "hsdp")

    def _fused_apart(self, every: list[dict]) -> bool:
        """Whether ``fused`` differs within a replica slot whose ranks compute the same updates."""
        if not self._repeats_updates():
            return False
        return any(len({m["fused"] for m in every if m["slot"] == s}) > 1 for s in {m["slot"] for m in every})

    def _disagree(self, hypers: list[Hyper], active_ids: list[int], agreed: Tensor, norms: Tensor) -> None:
        """Every rank raises the same RanksDisagreeError, naming what differs (an error path only)."""
        from ..comm import RanksDisagreeError

        mine = {
            "refreshing": [self._name(i) for i in self._refreshing(hypers, active_ids)],
            "groups": [astuple(h) for h in hypers],
            "calls": self.calls,
            "stepped": active_ids,
            "norms": norms.double().tolist(),
            "slot": slot[1] if (slot := self.gradient_slot()) is not None else None,
            "fused": bool(self.fused),
        }
        every = self.exchange.gather_objects(mine)
        lines = []
        stepped_apart = len({tuple(m["stepped"]) for m in every}) > 1
        hint = (
            "under DDP, find_unused_parameters=True gives a parameter that some ranks did not use a "
            "gradient on every rank"
            if self.plan.topology.placement == "replicated"
            else "under FSDP2 and DeepSpeed every rank holds a gradient of each parameter used in the step: "
            "look for code that sets or leaves a gradient None on some ranks only"
        )
        for i in sorted(set().union(*(m["stepped"] for m in every))):
            without = [r for r, m in enumerate(every) if i not in m["stepped"]]
            if without:
                lines.append(
                    f"{self._name(i)} has no gradient on ranks {without} and one on the others: every "
                    f"rank must step the same parameters ({hint})"
                )
        for g, fields in enumerate(zip(*[m["groups"] for m in every], strict=True)):
            for k, name in enumerate(Hyper.__dataclass_fields__):
                values = [f[k] for f in fields]
                if len(set(values)) > 1:
                    lines.append(f"param group {g} {name}: {values} (by rank)")
        if self._fused_apart(every):
            lines.append(
                f"fused (the compiled elementwise step): {[m['fused'] for m in every]} (by rank); its "
                "compile failed on some ranks (see their warning), which then stepped eagerly and round "
                "otherwise: pass fused=False on every rank"
            )
        if len({m["calls"] for m in every}) > 1:
            lines.append(f"step() calls so far: {[m['calls'] for m in every]} (by rank)")
        if len({tuple(m["refreshing"]) for m in every}) > 1:
            lines.append(f"basis refreshes due now: {[m['refreshing'] for m in every]} (by rank)")
        slots = slot[0] if (slot := self.gradient_slot()) is not None else 0
        if not bool(agreed[1 : 1 + slots].all()) and not stepped_apart:
            lines.append(self._gradients_differ(active_ids, every))
        raise RanksDisagreeError(
            f"SOAP: ranks disagree at optimizer step {self.calls} (checked in the finite-flag all_reduce): "
            + "; ".join(lines or ["details differ in a way SOAP could not name"])
            + ". Every rank must step the same parameters with the same options."
        )

    def _gradients_differ(self, active_ids: list[int], every: list[dict]) -> str:
        """The line of the disagreement error for gradients that differ between replicas: which
        parameters (their norms differ within a replica slot), and the usual causes."""
        differ, slots = [], {m["slot"] for m in every}
        for k, i in enumerate(active_ids):
            if any(
                len({m["norms"][k] for m in every if m["slot"] == s and len(m["norms"]) > k}) > 1
                for s in slots
            ):
                differ.append(self._name(i))
        named = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        if self.plan.topology.placement == "replicated":
            causes = (
                "step only after DDP's all-reduce (with no_sync, on the synchronising pass), keep every "
                "replica's data loader and model in step, and wrap the model in DDP after setting "
                "requires_grad (DDP does not all-reduce a parameter that was frozen when it was built); "
                "on CPU, Accelerate needs Accelerator(cpu=True) and the HF Trainer use_cpu=True, else no "
                "DDP wraps the model and each process trains alone"
            )
        else:
            causes = (
                "step only after FSDP2's all-reduce across the replicas (when accumulating with "
                "set_requires_all_reduce(False), after the backward that all-reduces), keep every replica's "
                "data loader and model in step, and change gradients after backward alike on every rank"
            )
        return f"the gradients {'of ' + named + ' ' if named else ''}differ between replicas: {causes}"
