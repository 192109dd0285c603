"""The SOAP engine for the blocks one rank holds: its storage, and the step and refresh it runs.

It is built once, at the first step, from the block/factor table (``layout.plan_param``), the plan
(``plan.build_plan``) and the parameters it sees then. One process is the one-rank case: every
block is local, this process owns every factor, and its exchange moves nothing
(``engine.local.LocalExchange``). The step is ``engine.step``; the one refresh path, with its
installs, is ``engine.refresh``. Nothing here imports torch.distributed.
"""

from __future__ import annotations

import warnings
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import linalg
from ..layout import ParamLayout
from ..plan import SINGLE, FactorEntry, Plan, build_plan
from ..plan.schedule import refresh_phases
from ..stores import BlockDim, BlockStack, FactorSlot, FactorStore, moment_dtype
from .agreement import AgreementMixin
from .async_refresh import AsyncRefreshMixin, LaunchedRefresh
from .local import LocalExchange
from .refresh import Pending, RefreshMixin, consecutive
from .step import Hyper, StepMixin, apply_update
from .stream import RefreshStream

Tensor = torch.Tensor
__all__ = ["Counters", "Hyper", "INSTALLED_AT_KEPT", "SoapEngine", "apply_update"]


INSTALLED_AT_KEPT = 4096  # installed_at keeps the most recent entries only: state must not grow with steps
INDEX_CACHE_SIZE = 4096  # index tensors kept by _index; cleared when full


@dataclass
class Counters:
    """What the optimizer did, for ``SOAP.stats()``."""

    refreshes: int = 0
    factors_refreshed: int = 0
    installs: torch.Tensor | None = None  # bases installed, summed on the device: no host sync per install
    refresh_failures: int = 0
    nonfinite_params_warned: int = 0
    refresh_seconds: float = 0.0
    owner_seconds: float = 0.0  # refresh time spent before the broadcasts start (stats in, owned work)
    eigh_seconds: float = 0.0
    side_stream_seconds: float = 0.0  # span of the asynchronous refreshes on their CUDA stream
    installed_at: deque[tuple[int, int]] = field(  # (param, first step using it), the most recent only
        default_factory=lambda: deque(maxlen=INSTALLED_AT_KEPT)
    )

    def count_installs(self, ok: torch.Tensor) -> None:
        """Count the bases of ``ok`` put into use; a failed refresh keeps its old basis, not counted."""
        n = ok.sum()
        self.installs = n if self.installs is None else self.installs + n

    @property
    def bases_installed(self) -> int:
        return 0 if self.installs is None else int(self.installs)


class SoapEngine(AgreementMixin, StepMixin, RefreshMixin, AsyncRefreshMixin):
    """Stacks, factor stores and the per-parameter bookkeeping (step counts, installs)."""

    def __init__(
        self,
        layouts: list[ParamLayout],
        params: list[Tensor],
        *,
        factor_dtype: torch.dtype,
        refresh_delay: int,
        qr_method: str = "auto",
        fused: bool | None = None,
        plan: Plan | None = None,
        exchange: Any = None,
        solver: linalg.Solver | None = None,
        refresh_schedule: str = "all",
        basis_dtype: torch.dtype | None = None,
        async_refresh: bool = False,
        writes_updates: bool | Sequence[bool] = False,
    ) -> None:
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"SOAP needs all parameters on one device, got {sorted(map(str, devices))}")
        self.device = params[0].device if params else torch.device("cpu")
        self.layouts = layouts
        self.param_dtypes = [p.dtype for p in params]
        # Per parameter (or True for all): step() gets an update buffer (compute dtype) in its place
        # in ``params`` and writes its update there instead of applying it; the runner sends the
        # update to the ranks holding the rows (placements owner and zero send updates, not values).
        self.writes_updates = (
            [bool(writes_updates)] * len(layouts)
            if isinstance(writes_updates, bool)
            else [bool(w) for w in writes_updates]
        )
        self.factor_dtype = factor_dtype
        self.basis_dtype = basis_dtype or factor_dtype
        self.refresh_delay = refresh_delay
        # CholeskyQR2 is batched GEMMs (fast on GPUs); on CPUs LAPACK's Householder QR does fewer flops.
        self.qr_method = (
            qr_method
            if qr_method != "auto"
            else ("cholesky_qr2" if self.device.type == "cuda" else "householder")
        )
        # async_refresh: refreshes after the first run on a side stream (engine.async_refresh), and
        # their QR reads nothing on the host (a breakdown is redone at the next step's finish)
        self.side = RefreshStream(self.device) if async_refresh else None
        self._launched: list[LaunchedRefresh] = []  # launched on the side stream, finished next step
        self.solver = (
            solver if solver is not None else linalg.EighPowerQR(self.qr_method, fallback=not async_refresh)
        )
        # None: compile where it pays (CUDA); on a CPU the one-time compile costs seconds for little
        self.fused = (self.device.type == "cuda") if fused is None else fused
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
        self.exchange = exchange if exchange is not None else LocalExchange()  # comm.Exchange across ranks
        self.entry_slot: dict[FactorEntry, tuple[FactorStore, int]] = {}
        self.slot_entries: dict[int, list[FactorEntry]] = {}
        self.calls = 0
        # (slots, this rank's slot) where ranks hold replicas of the same gradient rows beyond what the
        # plan's topology says (owner over an HSDP mesh): agreement.gradient_slot
        self.replica_slots: tuple[int, int] | None = None
        self.refresh_schedule = refresh_schedule
        self.phases: list[int] | None = None  # refresh phase of every parameter (plan.schedule)
        self.loaded_phases: dict[int, int] = {}  # a checkpoint's phases, applied by fix_phases
        self.broken: tuple[int, str] | None = None  # (step, error) when a refresh raised under several ranks
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
            self.stores[size] = FactorStore(size, self.factor_dtype, self.device, self.basis_dtype)
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
            consecutive(slots, store.contributors, slots),
            stat_rows,
            consecutive(stat_rows, store.contributors, slots),
        )

    def _index(self, values: list[int]) -> Tensor:
        """A device index tensor, cached. On CUDA it is copied from pinned memory without blocking (a
        plain host-to-device copy waits for every queued kernel). The cache is bounded: a model whose
        set of parameters with gradients changes from step to step meets new keys."""
        key = tuple(values)
        if key not in self._indices:
            if len(self._indices) >= INDEX_CACHE_SIZE:
                self._forget_indices()
            host = torch.tensor(key, dtype=torch.long)
            if self.device.type == "cuda":
                host = host.pin_memory()  # the host allocator keeps it until the copy has run
            self._indices[key] = host.to(self.device, non_blocking=True)
        return self._indices[key]

    def _forget_indices(self) -> None:
        """Empty the index cache. A launched refresh may still read these on the side stream: the
        allocator must not hand their memory to the step's stream before that work has run."""
        stream = self.side.stream if self.side is not None else None
        if stream is not None:
            for index in self._indices.values():
                index.record_stream(stream)
        self._indices.clear()

    # ----- the refresh schedule -----
    def fix_phases(self, frequencies: list[int]) -> None:
        """Every parameter's refresh phase, fixed at the first step from the plan and the groups' k
        (``frequencies``, per group), or as a loaded checkpoint saved them: under "staggered" the
        phases follow the owners, so a run resumed at another world size keeps the saved ones."""
        if self.phases is None:
            k_of = [frequencies[lay.group] for lay in self.plan.layouts]
            self.phases = refresh_phases(self.plan, k_of, self.refresh_schedule)
        self.apply_loaded_phases()

    def apply_loaded_phases(self) -> None:
        """A loaded checkpoint's phases over the computed ones (kept until those exist)."""
        if self.phases is not None:
            for i, phase in self.loaded_phases.items():
                self.phases[i] = phase
            self.loaded_phases = {}

    # ----- the step -----
    @torch.no_grad()
    def _name(self, index: int) -> str:
        """The parameter's name and whole shape (this rank's layout may hold a shard or no rows)."""
        full = self.plan.layouts if self.plan is not None and self.plan.layouts else self.layouts
        whole = full[index]
        return f"{whole.name} (shape {tuple(whole.shape)})"

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

    def report_nonfinite(self) -> None:
        """Warn now about every parameter whose gradient was skipped so far (a host read; the steps
        leave that to the next refresh; stats() calls it)."""
        self._warn_nonfinite(list(range(self.nonfinite_seen.numel())), when="read by stats()")

    def _warn_nonfinite(
        self, param_ids: list[int], seen: list[bool] | None = None, when: str = "reported at a basis refresh"
    ) -> None:
        """One warning naming every parameter whose gradient was skipped as non-finite and not named
        before (the steps note it on the device; it is read here, at a refresh, or by stats())."""
        if seen is None:
            seen = self.nonfinite_seen.tolist()  # a host sync, only at refresh time
        new = [i for i in param_ids if seen[i] and ("nonfinite", i) not in self._warned]
        if not new:
            return
        self._warned.update(("nonfinite", i) for i in new)
        self.counters.nonfinite_params_warned += len(new)
        names = ", ".join(self._name(i) for i in new[:5])
        names += f" and {len(new) - 5} more" if len(new) > 5 else ""
        warnings.warn(
            f"SOAP: non-finite gradient for {names} (NaN/Inf, or a norm whose square overflows "
            f"factor_dtype={self.factor_dtype}) by step {self.calls} (seen on the device at each step, "
            f"{when}); those steps were skipped for the parameter (moments "
            "unchanged, weights given only the weight decay, factors decayed; at its first gradient, "
            "not started at all). Shown once per parameter.",
            RuntimeWarning,
            stacklevel=4,
        )
