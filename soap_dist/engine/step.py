"""The step: rotate the gradients into the eigenbases, Adam there, rotate back, update, accumulate.

A mixin of ``SoapEngine`` (engine.core), split out so that each file holds one idea; it works on the
engine's stacks and stores and calls the refresh (engine.refresh) when a parameter's step count
reaches a multiple of its precondition frequency.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import kernels
from ..layout import ParamLayout
from ..stores import BlockStack, FactorStore, moment_dtype
from .refresh import take

Tensor = torch.Tensor


@dataclass
class Hyper:
    """One param group's hyperparameters, read from the group at every step."""

    lr: float
    beta1: float
    beta2: float
    shampoo_beta: float
    eps: float
    weight_decay: float
    precondition_frequency: int
    normalize_grads: bool
    correct_bias: bool

    @classmethod
    def of(cls, group: dict) -> Hyper:
        beta1, beta2 = group["betas"]
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        return cls(
            float(group["lr"]),
            float(beta1),
            float(beta2),
            float(shampoo_beta),
            float(group["eps"]),
            float(group["weight_decay"]),
            int(group["precondition_frequency"]),
            bool(group["normalize_grads"]),
            bool(group["correct_bias"]),
        )


@dataclass
class Agreed:
    """The step every rank will take: the groups' hyperparameters, the parameters it steps (by index
    and as flags) and, per parameter, whether its gradient is finite on every rank."""

    hypers: list[Hyper]
    active: list[bool]
    active_ids: list[int]
    finite: Tensor


LERP_LIMIT = 1e30  # the lerp form scales the update by ~1/decay: beyond this it would overflow float32


def lerp_form(hyper: Hyper) -> bool:
    """Whether weight decay rides in one lerp (pieces scaled by -s (1 - c) / c, c = lr * wd), or needs
    a second pass (a decay so small, e.g. 1e-40, that 1 / c would overflow)."""
    decay = hyper.lr * hyper.weight_decay
    return decay > 0 and hyper.lr / max(1.0 - hyper.beta1, 1e-8) < LERP_LIMIT * decay


def update_scale(step_size: float, hyper: Hyper) -> float:
    decay = hyper.lr * hyper.weight_decay
    return -step_size * (1.0 - decay) / decay if lerp_form(hyper) else -step_size


def apply_update(targets: list[Tensor], pieces: list[Tensor], decay: float, lerp: bool = True) -> None:
    """W <- lerp(W, piece, decay) (pieces pre-scaled, see StepMixin._adam_step), or W += piece
    (then W *= 1 - decay, when decay is too small for the lerp form)."""
    if not targets:
        return
    if decay <= 0 or not lerp:
        torch._foreach_add_(targets, pieces)
        if decay > 0:
            torch._foreach_mul_(targets, 1.0 - decay)
    elif targets[0].dtype == pieces[0].dtype:
        torch._foreach_lerp_(targets, pieces, decay)
    else:  # lerp needs one dtype (e.g. bf16 weights, float32 update): the same in two passes
        torch._foreach_mul_(targets, 1.0 - decay)
        torch._foreach_add_(targets, pieces, alpha=decay)


# Devices on which a factor's statistics from several row blocks are summed before one index_add_
# with distinct rows: CUDA's index_add_ adds a repeated row in whatever order its atomics land, so
# replicas that repeat an update (owner_scope="shard_group") could drift apart in the last bit. On
# CPU index_add_ adds repeated rows one after another, in block order: kept, bit for bit.
SUMMED_FIRST_ON = ("cuda",)


class StepMixin:
    """``SoapEngine.step`` and what it needs (see engine.core for the attributes)."""

    # ----- the step -----
    def step(
        self,
        groups: list[dict],
        params: list[Tensor],
        grads: list[Tensor | None] | None = None,
        active: list[bool] | None = None,
    ) -> None:
        """One optimizer step on the local blocks: the ranks' agreement (engine.agreement), then the
        step itself.

        ``params``/``grads`` are this rank's tensors (local shards under FSDP2); ``active`` says which
        parameters have a gradient this step, decided on the global parameter so that every rank
        counts the same steps (a rank with an empty shard still takes part in the refreshes).
        """
        if grads is None:
            grads = [p.grad for p in params]
        if active is None:
            active = [g is not None and p.numel() > 0 for p, g in zip(params, grads, strict=True)]
        agreed = self.agree(groups, grads, active)
        if agreed is not None:
            self.apply(agreed, params, grads)

    def apply(self, agreed: Agreed, params: list[Tensor], grads: list[Tensor | None]) -> None:
        """The step the ranks agreed on (``agree``): installs, Adam in the eigenbases, accumulation,
        and the refreshes due. ``grads`` may be other tensors than the ones agreed on: under owner,
        the gathered whole gradients at their owners."""
        hypers, active, active_ids, finite = agreed.hypers, agreed.active, agreed.active_ids, agreed.finite
        upcoming = {i: self.steps[i] + 1 for i in active_ids if self.started[i]}
        due = [i for i, t in upcoming.items() if self.install_step.get(i) == t]
        if due:
            self._install_pending(due)
        grad_cache: dict[int, Tensor] = {}
        deferred: dict[int, list[tuple[int, Tensor]]] = defaultdict(list)
        shared_updates: list[tuple[FactorStore, Tensor, list[int], Tensor, float]] = []
        for stack in self.stacks:
            subsets: dict[tuple[bool, int], list[int]] = defaultdict(list)
            for pos, (lay, _) in enumerate(stack.members):
                if active[lay.index]:
                    subsets[(self.started[lay.index], upcoming.get(lay.index, 0))].append(pos)
            for (started, t), positions in subsets.items():
                self._run_subset(
                    stack,
                    positions,
                    started,
                    t,
                    hypers[stack.group],
                    params,
                    grads,
                    finite,
                    grad_cache,
                    deferred,
                    shared_updates,
                )
        self._apply_shared_updates(shared_updates)
        self._apply_deferred(deferred, params, hypers)
        first = [i for i in active_ids if not self.started[i]]
        updated = [i for i in active_ids if self.started[i]]
        for i in updated:
            self.steps[i] += 1
        with self._refusing_after_a_raise():
            if first:
                self._refresh(first, first=True)
                for i in first:
                    self.started[i] = True
            due = [i for i in updated if self._due(self.steps[i], i, hypers)]
            if due:
                self._refresh(due, first=False)

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Around all of one optimizer step on this rank (``SOAP.step`` wraps its placement's runner).

        Under several ranks, a raise after the step's first collective (or inside a refresh) may leave
        the ranks' states apart, and the others are waiting in a collective this rank will not join:
        mark the engine broken, so that later steps refuse (the run must restart), and post a failure
        notice, so that the waiting ranks stop within about a second with this error (comm.guard). A
        raise before any collective leaves nothing apart: the rank may fix the cause and step again.
        """
        self.refuse_if_broken()
        begun = self.exchange.collectives_begun()
        try:
            yield
        except BaseException as error:
            apart = self.exchange.collectives_begun() > begun and not getattr(error, "state_unchanged", False)
            if self.plan.topology.world > 1 and self.broken is None and apart:  # (else posted already)
                self._mark_broken(error)
            raise

    def refuse_if_broken(self) -> None:
        if self.broken is not None:
            raise RuntimeError(
                f"SOAP: step() raised in optimizer step {self.broken[0]} after that step's collectives had "
                f"begun ({self.broken[1]}); the ranks' optimizer states may differ since, and their "
                "collectives no longer pair: end the run on every rank and restart it from the last "
                "checkpoint."
            )

    @contextmanager
    def _refusing_after_a_raise(self) -> Iterator[None]:
        """A refresh that raised under several ranks leaves their state apart, even where it raised
        before this step's collectives (the finish of a launched refresh, at the next step or in a
        checkpoint's save or load): refuse later steps and tell the others."""
        try:
            yield
        except BaseException as error:
            if self.plan.topology.world > 1:  # other ranks may be inside the refresh's collectives now
                self._mark_broken(error)
            raise

    def _mark_broken(self, error: BaseException) -> None:
        """Refuse later steps, and tell the ranks waiting for this one why it will not join."""
        self.broken = (self.exchange.step, f"{type(error).__name__}: {error}")
        self.exchange.tell_peers(*self.broken)

    def _rotation_dtype(self, compute: torch.dtype) -> torch.dtype:
        """bf16 bases rotate in bf16 (half the bytes and, on GPUs, the fast matmuls); else ``compute``."""
        return torch.bfloat16 if self.basis_dtype == torch.bfloat16 else compute

    def _due(self, step: int, i: int, hypers: list[Hyper]) -> bool:
        """Whether parameter i refreshes after its step ``step``: every k steps, at its phase."""
        assert self.phases is not None  # fixed at the start of every step
        k = hypers[self.layouts[i].group].precondition_frequency
        return step % k == self.phases[i] % k

    def _grad_block(self, lay: ParamLayout, block: int, grad: Tensor, cache: dict[int, Tensor]) -> Tensor:
        if lay.index not in cache:
            g = grad if lay.permutation is None else grad.permute(lay.permutation)
            cache[lay.index] = g.reshape(lay.block_shape)
        start = lay.row_offsets[block]
        return cache[lay.index][start : start + lay.row_counts[block]]

    def _run_subset(
        self,
        stack: BlockStack,
        positions: list[int],
        started: bool,
        step: int,
        hyper: Hyper,
        params: list[Tensor],
        grads_in: list[Tensor | None],
        finite: Tensor,
        grad_cache: dict[int, Tensor],
        deferred: dict[int, list[tuple[int, Tensor]]],
        shared_updates: list[tuple[FactorStore, Tensor, list[int], Tensor, float]],
    ) -> None:
        full = len(positions) == len(stack.members)
        sel = None if full else self._index(positions)
        members = [stack.members[k] for k in positions]
        compute = torch.promote_types(moment_dtype(stack.param_dtype), self.factor_dtype)
        grads = torch.empty((len(members), *stack.dims), dtype=compute, device=self.device)
        # (passed in, never kept: a reference held past the step kept every gradient alive through the
        # next backward after zero_grad, twice the gradients' memory)
        sources = [self._grad_block(lay, b, grads_in[lay.index], grad_cache) for lay, b in members]
        torch._foreach_copy_(list(grads.unbind(0)), sources)
        param_index = stack.param_index if sel is None else stack.param_index.index_select(0, sel)
        flags = finite.index_select(0, param_index)
        grads.masked_fill_(~flags.view((-1,) + (1,) * len(stack.dims)), 0)
        # Per block dim: the store slots of these blocks, as a slice (a view) where they are consecutive
        # and unshared, else as a cached device index.
        slots = [None if bd is None else [bd.slots[k] for k in positions] for bd in stack.block_dims]
        rows = [
            None if bd is None else (bd.contiguous if full and bd.contiguous is not None else self._index(sl))
            for bd, sl in zip(stack.block_dims, slots, strict=True)
        ]
        if started:
            bases = [
                None if bd is None else take(bd.store.bases, r).to(self._rotation_dtype(compute))
                for bd, r in zip(stack.block_dims, rows, strict=True)
            ]
            self._adam_step(stack, sel, members, grads, bases, flags, step, hyper, params, deferred, compute)
        for j, bd in enumerate(stack.block_dims):
            if bd is None:
                continue
            if full and bd.stat_contiguous is not None:
                kernels.accumulate_statistic(
                    bd.store.factors[bd.stat_contiguous], grads, j, hyper.shampoo_beta
                )
                continue
            stat_rows = [bd.stat_rows[k] for k in positions]
            keep = [n for n, r in enumerate(stat_rows) if r >= 0]
            if not keep:  # another rank keeps these statistics
                continue
            picked = grads if len(keep) == len(positions) else grads.index_select(0, self._index(keep))
            kept = [stat_rows[n] for n in keep]
            if len(set(kept)) == len(kept) and all(
                bd.store.contributors[bd.slots[positions[n]]] == 1 for n in keep
            ):
                # unshared factors (e.g. the ones this rank owns): the same fused update as one process
                rows = self._index(kept)
                factors = bd.store.factors.index_select(0, rows)
                kernels.accumulate_statistic(factors, picked, j, hyper.shampoo_beta)
                bd.store.factors.index_copy_(0, rows, factors)
                continue
            stat = kernels.statistic(picked, j, scale=1.0 - hyper.shampoo_beta)
            shared_updates.append(
                (bd.store, self._index(kept), kept, stat.to(self.factor_dtype), hyper.shampoo_beta)
            )

    def _adam_step(
        self,
        stack: BlockStack,
        sel: Tensor | None,
        members: list[tuple[ParamLayout, int]],
        grads: Tensor,
        bases: list[Tensor | None],
        flags: Tensor,
        step: int,
        hyper: Hyper,
        params: list[Tensor],
        deferred: dict[int, list[tuple[int, Tensor]]],
        compute: torch.dtype,
    ) -> None:
        mdtype = stack.exp_avg.dtype
        exp_avg = stack.exp_avg if sel is None else stack.exp_avg.index_select(0, sel)
        exp_avg_sq = stack.exp_avg_sq if sel is None else stack.exp_avg_sq.index_select(0, sel)
        rot = self._rotation_dtype(compute)
        rotated = kernels.rotate(grads.to(rot), bases).to(mdtype)
        direction = self._adam_direction(rotated, exp_avg, exp_avg_sq, hyper, flags)
        if sel is not None:
            stack.exp_avg.index_copy_(0, sel, exp_avg)
            stack.exp_avg_sq.index_copy_(0, sel, exp_avg_sq)
        # The page: W <- (W - s U)(1 - c) with c = lr * wd, i.e. W <- lerp(W, a U, c) with
        # a = -s (1 - c) / c: one pass over the weights, the scale a riding in the last GEMM.
        step_size = kernels.bias_corrected_step(hyper.lr, hyper.beta1, hyper.beta2, step, hyper.correct_bias)
        decay = hyper.lr * hyper.weight_decay
        scale = update_scale(step_size, hyper)
        if hyper.normalize_grads:
            update = kernels.normalize_rms(kernels.rotate_back(direction.to(rot), bases).to(compute)).mul_(
                scale
            )
        else:
            update = kernels.rotate_back(direction.to(rot), bases, scale).to(compute)
        applied: tuple[list[Tensor], list[Tensor]] = ([], [])
        written: tuple[list[Tensor], list[Tensor]] = ([], [])
        for (lay, b), piece in zip(members, update.unbind(0), strict=True):
            p = params[lay.index]
            if lay.permutation is None and p.is_contiguous():
                start = lay.row_offsets[b]
                targets, pieces = written if self.writes_updates[lay.index] else applied
                targets.append(p.data.view(lay.block_shape)[start : start + lay.row_counts[b]])
                pieces.append(piece)
            else:
                deferred[lay.index].append((b, piece))
        apply_update(*applied, decay, lerp_form(hyper))
        if written[0]:
            torch._foreach_copy_(*written)

    def _adam_direction(
        self, rotated: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, hyper: Hyper, flags: Tensor
    ) -> Tensor:
        kw = dict(beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps, weight=flags)
        if self.fused:
            try:
                return kernels.fused_adam_direction()(rotated, exp_avg, exp_avg_sq, **kw)
            except Exception as error:  # e.g. no C++ compiler for inductor: fails before touching inputs
                if self._fused_requested:
                    raise
                self.fused = False
                warnings.warn(
                    f"SOAP: torch.compile of the fused elementwise step failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); using the eager path "
                    "(pass fused=False to skip the attempt).",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return kernels.adam_direction(rotated, exp_avg, exp_avg_sq, **kw)

    def _apply_deferred(
        self, deferred: dict[int, list[tuple[int, Tensor]]], params: list[Tensor], hypers: list[Hyper]
    ) -> None:
        """Parameters whose block space is not a view of their storage get their update here."""
        for index, pieces in deferred.items():
            lay = self.layouts[index]
            pieces.sort(key=lambda item: item[0])
            delta = torch.cat([piece for _, piece in pieces], dim=0).reshape(lay.permuted_shape)
            if lay.permutation is not None:
                delta = delta.permute(tuple(sorted(range(4), key=lambda k: lay.permutation[k])))
            if self.writes_updates[index]:  # the runner sends it to the rows' holders (see __init__)
                params[index].data.copy_(delta.reshape(lay.shape))
                continue
            h = hypers[lay.group]
            decay = h.lr * h.weight_decay
            apply_update([params[index].data], [delta.reshape(lay.shape)], decay, lerp_form(h))

    def _apply_shared_updates(
        self, updates: list[tuple[FactorStore, Tensor, list[int], Tensor, float]]
    ) -> None:
        """factor <- beta_s factor + (1 - beta_s) sum of its blocks' statistics, once per factor."""
        decayed: dict[int, set[int]] = defaultdict(set)
        for store, _, slots, _, beta in updates:
            fresh = sorted(set(slots) - decayed[id(store)])
            if fresh:
                rows = self._index(fresh)
                store.factors.index_copy_(0, rows, store.factors.index_select(0, rows).mul_(beta))
                decayed[id(store)].update(fresh)
        for store, index, slots, stat, _ in updates:
            if stat.device.type not in SUMMED_FIRST_ON or len(set(slots)) == len(slots):
                store.factors.index_add_(0, index, stat)  # repeated rows added in order, or distinct ones
                continue
            distinct = sorted(set(slots))
            # a factor fed by several row blocks here: their statistics summed first, by a reduction
            # (fixed order; a 0/1 matrix product would run in TF32 where the caller allows it)
            parts = []
            for slot in distinct:
                rows = [n for n, t in enumerate(slots) if t == slot]
                consecutive = rows == list(range(rows[0], rows[0] + len(rows)))  # a parameter's row blocks
                picked = stat[rows[0] : rows[0] + len(rows)] if consecutive else stat[self._index(rows)]
                parts.append(picked.sum(0))
            store.factors.index_add_(0, self._index(distinct), torch.stack(parts))

    # ----- bases -----
