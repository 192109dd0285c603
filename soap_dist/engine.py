"""The SOAP engine for the blocks one process holds: step, refresh and install, batched.

It is built once, at the first step, from the block/factor table (``layout.plan_param``) and the
parameters it sees then. One process is the one-rank case of the distributed engine: every block
is local and this process owns every factor. Nothing here imports torch.distributed.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernels, linalg
from .layout import ParamLayout
from .plan import SINGLE, FactorEntry, Plan, build_plan
from .stores import BlockDim, BlockStack, FactorSlot, FactorStore, moment_dtype

Tensor = torch.Tensor
REFRESH_CHUNK_BYTES = 1 << 29  # factors refreshed together are cut so each temporary stays under 512 MiB


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


INSTALLED_AT_KEPT = 4096  # installed_at keeps the most recent entries only: state must not grow with steps


@dataclass
class Counters:
    """What the optimizer did, for ``SOAP.stats()``."""

    refreshes: int = 0
    factors_refreshed: int = 0
    bases_installed: int = 0
    refresh_failures: int = 0
    nonfinite_params_warned: int = 0
    refresh_seconds: float = 0.0
    owner_seconds: float = 0.0  # refresh time spent before the broadcasts start (stats in, owned work)
    eigh_seconds: float = 0.0
    installed_at: deque[tuple[int, int]] = field(  # (param, first step using it), the most recent only
        default_factory=lambda: deque(maxlen=INSTALLED_AT_KEPT)
    )


def apply_update(targets: list[Tensor], pieces: list[Tensor], decay: float) -> None:
    """W <- lerp(W, piece, decay) (pieces pre-scaled, see _adam_step), or W += piece without decay."""
    if not targets:
        return
    if decay <= 0:
        torch._foreach_add_(targets, pieces)
    elif targets[0].dtype == pieces[0].dtype:
        torch._foreach_lerp_(targets, pieces, decay)
    else:  # lerp needs one dtype (e.g. bf16 weights, float32 update): the same in two passes
        torch._foreach_mul_(targets, 1.0 - decay)
        torch._foreach_add_(targets, pieces, alpha=decay)


def _rows_of(positions: list[int], index: Callable[[list[int]], Tensor]) -> slice | Tensor:
    """A slice when the positions are consecutive (a view, no copy), else a device index."""
    if positions == list(range(positions[0], positions[0] + len(positions))):
        return slice(positions[0], positions[0] + len(positions))
    return index(positions)


def _per_chunk(store: FactorStore) -> int:
    """How many factors of a store are refreshed together (bounds the temporaries' memory)."""
    return max(1, REFRESH_CHUNK_BYTES // (store.size**2 * store.factors.element_size()))


def _consecutive(rows: list[int], contributors: list[int], slots: list[int]) -> slice | None:
    """A slice over ``rows`` when they are consecutive, present and used by one block each."""
    first = rows[0]
    if first < 0 or any(contributors[s] != 1 for s in slots):
        return None
    return slice(first, first + len(rows)) if rows == list(range(first, first + len(rows))) else None


def _take(t: Tensor, rows: slice | Tensor) -> Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _put(t: Tensor, rows: slice | Tensor, value: Tensor) -> None:
    if isinstance(rows, slice):
        t[rows].copy_(value)
    else:
        t.index_copy_(0, rows, value)


@dataclass
class Pending:
    """A refreshed basis waiting for its install step (refresh_delay >= 1)."""

    bases: Tensor
    perm: Tensor
    ok: Tensor


class SoapEngine:
    """Stacks, factor stores and the per-parameter bookkeeping (step counts, installs)."""

    def __init__(
        self,
        layouts: list[ParamLayout],
        params: list[Tensor],
        *,
        factor_dtype: torch.dtype,
        refresh_delay: int,
        qr_method: str,
        fused: bool | None = None,
        plan: Plan | None = None,
        exchange: Any = None,
    ) -> None:
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"SOAP needs all parameters on one device, got {sorted(map(str, devices))}")
        self.device = params[0].device if params else torch.device("cpu")
        self.layouts = layouts
        self.param_dtypes = [p.dtype for p in params]
        self.factor_dtype = factor_dtype
        self.refresh_delay = refresh_delay
        # CholeskyQR2 is batched GEMMs (fast on GPUs); on CPUs LAPACK's Householder QR does fewer flops.
        self.qr_method = (
            qr_method
            if qr_method != "auto"
            else ("cholesky_qr2" if self.device.type == "cuda" else "householder")
        )
        self.fused = True if fused is None else fused
        self._fused_requested = fused is True
        self.steps = [0] * len(layouts)
        self.started = [False] * len(layouts)
        self.install_step: dict[int, int] = {}
        self.counters = Counters()
        self._warned: set[tuple[str, int]] = set()
        self.stores: dict[int, FactorStore] = {}
        self.stacks: list[BlockStack] = []
        self.row_slots: dict[tuple[int, int], tuple[FactorStore, int]] = {}
        self.shared_slots: dict[tuple[int, int], tuple[FactorStore, int]] = {}
        self.pending: dict[int, Pending] = {}
        self._indices: dict[tuple[int, ...], Tensor] = {}
        self._users: dict[int, list[tuple[BlockStack, int, BlockDim]]] = defaultdict(
            list
        )  # store -> stack dims
        self.plan = plan if plan is not None else build_plan(layouts, SINGLE)
        self.exchange = exchange  # comm.Exchange when the plan spans several ranks, else None
        self.entry_slot: dict[FactorEntry, tuple[FactorStore, int]] = {}
        self.slot_entries: dict[int, list[FactorEntry]] = {}
        self.calls = 0
        self._inflight: list[tuple[int, Any, list[int]]] = []  # (wait at call, broadcasts, params)
        self._build(params)
        self.nonfinite_seen = torch.zeros(len(layouts), dtype=torch.bool, device=self.device)

    # ----- construction -----
    def _build(self, params: list[Tensor]) -> None:
        keyed: dict[tuple, BlockStack] = {}
        for lay, p in zip(self.layouts, params, strict=True):
            for b in range(len(lay.row_counts)):
                dims = lay.block_dims(b)
                key = (lay.group, dims, lay.preconditioned, p.dtype)
                if key not in keyed:
                    keyed[key] = BlockStack(lay.group, dims, p.dtype)
                    self.stacks.append(keyed[key])
                keyed[key].members.append((lay, b))
        per_stack: list[list[list[int]]] = []
        for stack in self.stacks:
            per_dim: list[list[int]] = [[] for _ in stack.dims]
            for j in range(len(stack.dims)):  # dim-major, so each (stack, dim) owns consecutive slots
                for lay, b in stack.members:
                    if lay.preconditioned[j]:
                        store, slot = self._slot_for(lay, j, b, stack.dims[j])
                        store.contributors[slot] += 1
                        per_dim[j].append(slot)
            per_stack.append(per_dim)
        self._map_entries()
        for store in self.stores.values():
            store.materialize([self.plan.accumulates(e) for e in self.slot_entries[store.size]])
        for stack, per_dim in zip(self.stacks, per_stack, strict=True):
            stack.block_dims = [self._block_dim(stack, j, slots) for j, slots in enumerate(per_dim)]
            for j, bd in enumerate(stack.block_dims):
                if bd is not None:
                    self._users[bd.store.size].append((stack, j, bd))
        for stack in self.stacks:
            mdtype = moment_dtype(stack.param_dtype)
            shape = (len(stack.members), *stack.dims)
            stack.exp_avg = torch.zeros(shape, dtype=mdtype, device=self.device)
            stack.exp_avg_sq = torch.zeros(shape, dtype=mdtype, device=self.device)
            stack.param_index = torch.tensor([lay.index for lay, _ in stack.members], device=self.device)

    def _map_entries(self) -> None:
        """Tie every store slot to its plan entry; owners get slots for factors they do not use."""
        topo = self.plan.topology
        for e in self.plan.entries:
            if e.owner != topo.rank and not self.plan.consumes(e):
                continue
            lay = self.layouts[e.param]
            table, key = (
                (self.shared_slots, (e.param, e.dim)) if e.shared else (self.row_slots, (e.param, e.block))
            )
            if key not in table:
                self._slot_for(lay, e.dim, e.block, e.size)
            store, slot = table[key]
            self.entry_slot[e] = (store, slot)
        reverse = {(id(store), slot): e for e, (store, slot) in self.entry_slot.items()}
        for size, store in self.stores.items():
            entries = []
            for slot, info in enumerate(store.slots):
                entry = reverse.get((id(store), slot))
                if entry is None:
                    raise RuntimeError(
                        f"SOAP: the local blocks of {self._name(info.param)} do not match the plan "
                        f"(dim {info.dim}, block {info.block}); the parameter's local shard is not the one "
                        "the placement predicts"
                    )
                entries.append(entry)
            self.slot_entries[size] = entries

    def _slot_for(self, lay: ParamLayout, dim: int, block: int, size: int) -> tuple[FactorStore, int]:
        if size not in self.stores:
            self.stores[size] = FactorStore(size, self.factor_dtype, self.device)
        store = self.stores[size]
        table, key = (
            (self.row_slots, (lay.index, block)) if dim == 0 else (self.shared_slots, (lay.index, dim))
        )
        if key not in table:
            table[key] = (store, store.allocate(FactorSlot(lay.index, dim, block if dim == 0 else -1)))
        return table[key]

    def _block_dim(self, stack: BlockStack, dim: int, slots: list[int]) -> BlockDim | None:
        if not slots:
            return None
        store = self.stores[stack.dims[dim]]
        stat_rows = [store.stat_rows[s] for s in slots]
        return BlockDim(
            store,
            slots,
            _consecutive(slots, store.contributors, slots),
            stat_rows,
            _consecutive(stat_rows, store.contributors, slots),
        )

    def _index(self, values: list[int]) -> Tensor:
        """A device index tensor, cached: a host-to-device copy would synchronise on CUDA."""
        key = tuple(values)
        if key not in self._indices:
            self._indices[key] = torch.tensor(key, dtype=torch.long, device=self.device)
        return self._indices[key]

    # ----- the step -----
    @torch.no_grad()
    def step(
        self,
        groups: list[dict],
        params: list[Tensor],
        grads: list[Tensor | None] | None = None,
        active: list[bool] | None = None,
    ) -> None:
        """One optimizer step on the local blocks.

        ``params``/``grads`` are this rank's tensors (local shards under FSDP2); ``active`` says which
        parameters have a gradient this step, decided on the global parameter so that every rank
        counts the same steps (a rank with an empty shard still takes part in the refreshes).
        """
        if grads is None:
            grads = [p.grad for p in params]
        if active is None:
            active = [g is not None and p.numel() > 0 for p, g in zip(params, grads, strict=True)]
        self.calls += 1
        while self._inflight and self._inflight[0][0] <= self.calls:
            _, flight, ids = self._inflight.pop(0)
            self._receive(flight, ids, first=False)
        active = self._skip_zero_first_gradients(list(active), grads)
        active_ids = [i for i, a in enumerate(active) if a]
        if not active_ids:
            return
        self._grads = grads
        hypers = [Hyper.of(g) for g in groups]
        finite = self._finite_flags(grads, active_ids)
        if self.exchange is not None:
            finite = self.exchange.all_finite(finite)
        self.nonfinite_seen |= ~finite
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
        if first:
            self._first_bases(first)
            for i in first:
                self.started[i] = True
        due = [
            i for i in updated if self.steps[i] % hypers[self.layouts[i].group].precondition_frequency == 0
        ]
        if due:
            self._refresh(due)

    def _skip_zero_first_gradients(self, active: list[bool], grads: list[Tensor | None]) -> list[bool]:
        """A parameter is started by its first gradient that is not exactly zero everywhere.

        DeepSpeed's fp16/bf16 stage-0 wrappers and DCP call ``step`` once with all-zero gradients to
        create optimizer state; a preconditioner built from zeros would hold an arbitrary basis until
        the first refresh. This costs one host sync per step, and only while a parameter is unstarted.
        """
        fresh = [i for i, a in enumerate(active) if a and not self.started[i]]
        if not fresh:
            return active
        empty = torch.ones((), dtype=torch.bool, device=self.device)  # an empty shard holds no non-zero
        zero = torch.stack([(grads[i] == 0).all() if grads[i].numel() else empty for i in fresh])
        if self.exchange is not None:  # every shard must be zero: the same decision on every rank
            zero = self.exchange.all_finite(zero)
        for i, z in zip(fresh, zero.tolist(), strict=True):
            if z:
                active[i] = False
        return active

    def _finite_flags(self, grads: list[Tensor | None], active_ids: list[int]) -> Tensor:
        """One flag per parameter: its gradient's norm is finite (no NaN/Inf, no overflow)."""
        norms = torch._foreach_norm([grads[i] for i in active_ids])
        flags = torch.stack(norms).isfinite()
        if len(active_ids) == len(grads):
            return flags
        full = torch.ones(len(grads), dtype=torch.bool, device=self.device)
        full[self._index(active_ids)] = flags
        return full

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
        sources = [self._grad_block(lay, b, self._grads[lay.index], grad_cache) for lay, b in members]
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
                None if bd is None else _take(bd.store.bases, r).to(compute)
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
        rotated = kernels.rotate(grads, bases).to(mdtype)
        direction = self._adam_direction(rotated, exp_avg, exp_avg_sq, hyper, flags)
        if sel is not None:
            stack.exp_avg.index_copy_(0, sel, exp_avg)
            stack.exp_avg_sq.index_copy_(0, sel, exp_avg_sq)
        # The page: W <- (W - s U)(1 - c) with c = lr * wd, i.e. W <- lerp(W, a U, c) with
        # a = -s (1 - c) / c: one pass over the weights, the scale a riding in the last GEMM.
        step_size = kernels.bias_corrected_step(hyper.lr, hyper.beta1, hyper.beta2, step, hyper.correct_bias)
        decay = hyper.lr * hyper.weight_decay
        scale = -step_size * (1.0 - decay) / decay if decay > 0 else -step_size
        if hyper.normalize_grads:
            update = kernels.normalize_rms(kernels.rotate_back(direction.to(compute), bases)).mul_(scale)
        else:
            update = kernels.rotate_back(direction.to(compute), bases, scale)
        targets, pieces = [], []
        for (lay, b), piece in zip(members, update.unbind(0), strict=True):
            p = params[lay.index]
            if lay.permutation is None and p.is_contiguous():
                start = lay.row_offsets[b]
                targets.append(p.data.view(lay.block_shape)[start : start + lay.row_counts[b]])
                pieces.append(piece)
            else:
                deferred[lay.index].append((b, piece))
        apply_update(targets, pieces, decay)

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
            h = hypers[lay.group]
            apply_update([params[index].data], [delta.reshape(lay.shape)], h.lr * h.weight_decay)

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
        for store, index, _, stat, _ in updates:
            store.factors.index_add_(0, index, stat)

    # ----- bases -----
    def _slots_of(self, param_ids: list[int]) -> dict[int, list[int]]:
        wanted = set(param_ids)
        found = {
            size: [k for k, slot in enumerate(store.slots) if slot.param in wanted]
            for size, store in self.stores.items()
        }
        return {size: slots for size, slots in found.items() if slots}

    def _chunks(self, store: FactorStore, slots: list[int]) -> Iterator[tuple[list[int], slice | Tensor]]:
        """Slots in groups whose temporaries stay under REFRESH_CHUNK_BYTES each (bounds peak memory)."""
        per = _per_chunk(store)
        for k in range(0, len(slots), per):
            part = slots[k : k + per]
            yield part, _rows_of(part, self._index)

    def _first_bases(self, param_ids: list[int]) -> None:
        """The first call: bases from a symmetric eigendecomposition, installed at once."""
        if self.exchange is not None:
            self._refresh_distributed(param_ids, first=True)
            return
        start = time.perf_counter()
        for size, slots in self._slots_of(param_ids).items():
            store = self.stores[size]
            for part, rows in self._chunks(store, slots):
                bases, ok = linalg.eigh_descending(_take(store.factors, rows))
                self._report_failures(store, part, ok.tolist(), "eigendecomposition")
                _put(store.bases, rows, torch.where(ok[:, None, None], bases, _take(store.bases, rows)))
        self.counters.eigh_seconds += time.perf_counter() - start
        self._warn_nonfinite(param_ids)

    def _refresh(self, param_ids: list[int]) -> None:
        """Power iteration + QR for every factor of these parameters; install now or stash for later."""
        if self.exchange is not None:
            self._refresh_distributed(param_ids, first=False)
            return
        start = time.perf_counter()
        self.counters.refreshes += 1
        for size, slots in self._slots_of(param_ids).items():
            store = self.stores[size]
            for part, rows in self._chunks(store, slots):
                old = _take(store.factors, rows), _take(store.bases, rows)
                bases, perm, ok = linalg.power_iteration_refresh(*old, self.qr_method)
                self._report_failures(store, part, ok.tolist(), "refresh")
                if self.refresh_delay:
                    self._stash(store, rows, bases, perm, ok)
                else:
                    self._install_rows(store, part, rows, bases, perm, ok)
            self.counters.factors_refreshed += len(slots)
        if self.refresh_delay:
            for i in param_ids:
                self.install_step[i] = self.steps[i] + 1 + self.refresh_delay
        else:
            self._record_installs(param_ids)
        self.counters.refresh_seconds += time.perf_counter() - start
        self._warn_nonfinite(param_ids)

    def _refresh_distributed(self, param_ids: list[int], first: bool) -> None:
        """The sharded refresh: statistics to owners, owners refresh, bases broadcast to consumers.

        Every rank walks the same plan entries in the same order, so the collectives match. New
        bases are installed at step t + 1 + refresh_delay (at once for the first call).
        """
        start = time.perf_counter()
        plan, topo = self.plan, self.plan.topology
        wanted = set(param_ids)
        entries = [e for e in plan.entries if e.param in wanted]
        reduced = self.exchange.reduce_to_owners(
            [e for e in entries if plan.needs_reduce(e) and e.owner // topo.shards == topo.replica],
            self._partial_statistic,
        )
        results: dict[FactorEntry, tuple[Tensor, Tensor, Tensor]] = {}
        by_size: dict[int, list[FactorEntry]] = defaultdict(list)
        for e in entries:
            if e.owner == topo.rank:
                by_size[e.size].append(e)
        for size, owned in by_size.items():
            store = self.stores[size]
            slots = [self.entry_slot[e][1] for e in owned]
            per = _per_chunk(store)
            for k in range(0, len(owned), per):
                part, part_slots = owned[k : k + per], slots[k : k + per]
                factors = torch.stack(
                    [
                        reduced[e] if e in reduced else store.factors[store.stat_rows[slot]]
                        for e, slot in zip(part, part_slots, strict=True)
                    ]
                )
                if first:
                    t0 = time.perf_counter()
                    bases, ok = linalg.eigh_descending(factors)
                    perm = torch.arange(size, device=self.device).expand(len(part), size)
                    self.counters.eigh_seconds += time.perf_counter() - t0
                else:
                    old = store.bases.index_select(0, self._index(part_slots))
                    bases, perm, ok = linalg.power_iteration_refresh(factors, old, self.qr_method)
                self._report_failures(
                    store, part_slots, ok.tolist(), "eigendecomposition" if first else "refresh"
                )
                for n, e in enumerate(part):
                    results[e] = (bases[n], perm[n], ok[n])
            if not first:
                self.counters.factors_refreshed += len(owned)
        flight = self.exchange.broadcast_bases(entries, results)
        if not first:
            self.counters.owner_seconds += time.perf_counter() - start
        if first:
            self._receive(flight, param_ids, first=True)
        else:
            self.counters.refreshes += 1
            if self.refresh_delay:
                for i in param_ids:
                    self.install_step[i] = self.steps[i] + 1 + self.refresh_delay
                self._inflight.append((self.calls + 1 + self.refresh_delay, flight, param_ids))
            else:
                self._receive(flight, param_ids, first=False)
        if not first:  # the first call's eigh is counted in eigh_seconds, as in one process
            self.counters.refresh_seconds += time.perf_counter() - start
        self._warn_nonfinite(param_ids)

    def _partial_statistic(self, entry: FactorEntry) -> Tensor | None:
        store, slot = self.entry_slot.get(entry, (None, -1))
        if store is None or store.stat_rows[slot] < 0:
            return None
        return store.factors[store.stat_rows[slot]]

    def _receive(self, flight: Any, param_ids: list[int], first: bool) -> None:
        """Wait for broadcast bases; put them in (first call) or stash them for their install step."""
        got = flight.wait()
        by_store: dict[int, list[tuple[int, tuple[Tensor, Tensor, Tensor]]]] = defaultdict(list)
        for e, result in got.items():
            if e in self.entry_slot:
                store, slot = self.entry_slot[e]
                by_store[store.size].append((slot, result))
        # Stores in the engine's own order, never the order results arrived in: carrying m through
        # two dims' new bases in another order rounds differently, and replicas would drift apart.
        for size in [size for size in self.stores if size in by_store]:
            store, items = self.stores[size], by_store[size]
            items.sort(key=lambda item: item[0])
            part = [slot for slot, _ in items]
            rows = self._index(part)
            bases = torch.stack([r[0] for _, r in items]).to(store.dtype)
            perm = torch.stack([r[1] for _, r in items])
            ok = torch.stack([r[2] for _, r in items]).bool()
            if first:
                old = store.bases.index_select(0, rows)
                store.bases.index_copy_(0, rows, torch.where(ok[:, None, None], bases, old))
            elif self.refresh_delay:
                self._stash(store, rows, bases, perm, ok)
            else:  # installed at once: no stash, so no second copy of the bases
                self._install_rows(store, part, _rows_of(part, self._index), bases, perm, ok)
        if not first and not self.refresh_delay:
            self._record_installs(param_ids)

    def complete_inflight(self) -> None:
        """Wait for every outstanding broadcast (before a checkpoint); installs keep their step."""
        while self._inflight:
            _, flight, ids = self._inflight.pop(0)
            self._receive(flight, ids, first=False)

    def pending_for(self, store: FactorStore) -> Pending:
        """The stash of refreshed bases waiting for their install step (refresh_delay >= 1)."""
        if store.size not in self.pending:
            n, d = len(store.slots), store.size
            self.pending[store.size] = Pending(
                store.bases.clone(),
                torch.arange(d, device=self.device).repeat(n, 1),
                torch.zeros(n, dtype=torch.bool, device=self.device),
            )
        return self.pending[store.size]

    def _stash(
        self, store: FactorStore, rows: slice | Tensor, bases: Tensor, perm: Tensor, ok: Tensor
    ) -> None:
        pend = self.pending_for(store)
        _put(pend.bases, rows, bases)
        _put(pend.perm, rows, perm)
        _put(pend.ok, rows, ok)

    def _install_pending(self, param_ids: list[int]) -> None:
        for size, slots in self._slots_of(param_ids).items():
            store = self.stores[size]
            pend = self.pending_for(store)
            for part, rows in self._chunks(store, slots):
                bases, perm, ok = _take(pend.bases, rows), _take(pend.perm, rows), _take(pend.ok, rows)
                self._install_rows(store, part, rows, bases, perm, ok)
        self._record_installs(param_ids)
        for i in param_ids:
            self.install_step.pop(i, None)

    def _install_rows(
        self,
        store: FactorStore,
        part: list[int],
        rows: slice | Tensor,
        bases: Tensor,
        perm: Tensor,
        ok: Tensor,
    ) -> None:
        """New bases in where ``ok``, and the moments of the blocks using them carried over.

        m goes from the old basis to the new one along the factor's dim, v is re-indexed by the sort.
        Done per chunk of slots, so no buffer the size of all bases is needed.
        """
        old = _take(store.bases, rows)
        new = torch.where(ok[:, None, None], bases, old)
        perm = torch.where(ok[:, None], perm, torch.arange(store.size, device=self.device))
        chunk_row = {slot: r for r, slot in enumerate(part)}
        for stack, dim, bd in self._users[store.size]:
            positions = [k for k, slot in enumerate(bd.slots) if slot in chunk_row]
            if not positions:
                continue
            blocks = _rows_of(positions, self._index)
            source = self._index([chunk_row[bd.slots[k]] for k in positions])
            moved = self._carry(
                _take(stack.exp_avg, blocks),
                dim,
                old.index_select(0, source),
                new.index_select(0, source),
                ok.index_select(0, source),
                bd,
            )
            _put(stack.exp_avg, blocks, moved)
            p = perm.index_select(0, source)
            _put(stack.exp_avg_sq, blocks, kernels.permute_along(_take(stack.exp_avg_sq, blocks), dim, p))
        _put(store.bases, rows, new)
        self.counters.bases_installed += len(part)

    def _carry(self, m: Tensor, dim: int, old: Tensor, new: Tensor, ok: Tensor, bd: BlockDim) -> Tensor:
        """P_new(P_old^-1(m)) along ``dim``; blocks whose refresh failed keep m exactly.

        Either two contractions of m (old^T, then new), or one with T = Q_old^T Q_new at the cost of
        forming T (2 d^3): the first is cheaper when the factor is larger than the block (d^2 > numel),
        e.g. the 4d-row factor of an MLP weight.
        """
        dtype = m.dtype
        if bd.contiguous is not None and bd.store.size**2 > m[0].numel():
            moved = kernels.contract(kernels.contract(m, dim, old.mT.to(dtype)), dim, new.to(dtype))
            return torch.where(ok.view((-1,) + (1,) * (m.dim() - 1)), moved, m)
        eye = torch.eye(bd.store.size, dtype=old.dtype, device=old.device)
        transfer = torch.where(ok[:, None, None], linalg.accurate_matmul(old.mT, new), eye)
        return kernels.contract(m, dim, transfer.to(dtype))

    def _record_installs(self, param_ids: list[int]) -> None:
        self.counters.installed_at.extend((i, self.steps[i] + 1) for i in sorted(param_ids))

    # ----- warnings -----
    def _name(self, index: int) -> str:
        lay = self.layouts[index]
        return f"{lay.name} (shape {tuple(lay.shape)})"

    def _report_failures(self, store: FactorStore, slots: list[int], ok: list[bool], what: str) -> None:
        for slot, good in zip(slots, ok, strict=True):
            if good:
                continue
            self.counters.refresh_failures += 1
            owner = store.slots[slot]
            key = (what, owner.param)
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"SOAP: {what} failed for a factor of {self._name(owner.param)} (dim {owner.dim}); "
                    "its old basis is kept. This warning is shown once per parameter.",
                    RuntimeWarning,
                    stacklevel=4,
                )

    def _warn_nonfinite(self, param_ids: list[int]) -> None:
        seen = self.nonfinite_seen.tolist()  # a host sync, only at refresh time
        for i in param_ids:
            if seen[i] and ("nonfinite", i) not in self._warned:
                self._warned.add(("nonfinite", i))
                self.counters.nonfinite_params_warned += 1
                warnings.warn(
                    f"SOAP: non-finite gradient for {self._name(i)}; the steps where it occurred were "
                    "skipped "
                    "for this parameter (moments and weights unchanged, factors decayed). Shown once.",
                    RuntimeWarning,
                    stacklevel=4,
                )
