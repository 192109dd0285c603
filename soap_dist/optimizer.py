"""``soap_dist.SOAP``: the drop-in torch.optim.Optimizer.

The facade validates arguments, keeps torch.optim's param-group contract, and builds the engine
lazily at the first step (never in ``__init__``: Accelerate swaps an optimizer's parameters for
sharded ones after construction). The math lives in ``kernels`` and ``linalg``; the batching and
bookkeeping in ``engine``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .autocast import autocast_off
from .comm import Exchange
from .comm.guard import DEFAULT_TIMEOUT_S
from .engine import SoapEngine
from .idle import warn_if_never_a_gradient
from .layout import ParamLayout, plan_in_group
from .optimizer_state import StateMixin
from .options import (
    FACTOR_DTYPES,
    as_pair,
    async_refresh_on,
    check,
    check_async_refresh,
    check_groups_and_mesh,
    check_layout_unchanged,
    check_placement,
    is_integer,
    is_number,
    validate_group,
    validate_stepped_group,
    warn_misspelt_group_keys,
)
from .placements import Placement, local, resolve, wrapper
from .placements.owner import OWNER_SCOPES, OwnerRunner
from .placements.zero import ZeroRunner
from .plan import build_plan, local_layouts
from .plan.costs import prefers_owner
from .plan.schedule import SCHEDULES
from .plan_check import check_first_step
from .state_check import saved_keys
from .state_io import load_engine_state, save_engine_state

Tensor = torch.Tensor


class SOAP(StateMixin, torch.optim.Optimizer):
    """SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., ICLR 2025).

    Same keyword names and defaults as the authors' single-GPU SOAP, so its users change one
    import. The first ``step()`` of each parameter only initialises its factors and eigenbases
    (the parameter does not move), as in the reference. See docs/algorithm.md for the math and
    the state each parameter carries.

    Args:
        params: parameters or param groups (named parameters are accepted and used in messages).
        lr: learning rate (3e-3).
        betas: Adam's (beta1, beta2) ((0.95, 0.95)).
        shampoo_beta: EMA rate of the factors; negative means betas[1] (-1).
        eps: Adam epsilon, added to sqrt(v) (1e-8).
        weight_decay: decoupled, applied after the step as W -= lr * wd * W (0.01).
        precondition_frequency: refresh the eigenbases every k steps (10).
        max_precond_dim: a dim larger than this gets no factor (10000).
        merge_dims: merge adjacent dims while their product stays <= max_precond_dim (False).
        precondition_1d: give 1-D tensors a full factor (False: plain AdamW for them).
        normalize_grads: divide each block's update by its RMS (False).
        data_format: "channels_first" or "channels_last" (4-D tensors under merge_dims).
        correct_bias: Adam bias correction (True).
        block_size: cut dim 0 into row blocks of at most this many rows, each with its own row
            factor; the other dims' factors stay whole (None: no cut, the reference).
        refresh_delay: install a refreshed basis this many steps late (0: the reference's
            synchronous semantics; must be < precondition_frequency).
        factor_dtype: dtype of factors, bases and their decompositions (float32 or float64).
        qr_method: "auto" (cholesky_qr2 on CUDA, householder elsewhere), "cholesky_qr2" (batched
            matmuls, Householder fallback) or "householder" (LAPACK/cuSOLVER QR). Same Q either way.
        fused: compile the Adam-in-eigenbasis elementwise work into one kernel with torch.compile
            (None: on CUDA, where it pays, try it and fall back to eager with a warning if
            compilation fails; eager elsewhere; False: eager; True: compile or raise).
        placement: "auto" (picked at the first step from the parameters and the process group),
            "single", "replicated" (DDP), "fsdp-local" or "owner" (FSDP2), "hsdp" or "owner"
            (HSDP); under DeepSpeed ZeRO 1-3 "auto" (zero) or "owner". See docs/design.md.
        process_group: the data-parallel group for "replicated" (default: the world group).
        device_mesh: a 1-D mesh for "replicated"; with DTensor parameters it must be theirs.
        collective_timeout: seconds SOAP's own collectives wait before failing with a message that
            names the collective, the step and the ranks that did not arrive (600). On CUDA only
            with TORCH_NCCL_BLOCKING_WAIT=1: else the waits are stream-ordered (the host never
            blocks), NCCL's watchdog ends a stuck collective after the process group's timeout,
            and another value than the default is warned about.
        refresh_schedule: "all" (the reference: every factor at the steps divisible by k) or
            "staggered" (each parameter at a fixed phase of its k steps, balanced by refresh cost
            per owner, so each step carries about 1/k of the refresh).
        basis_dtype: dtype the bases are stored in (None: factor_dtype). torch.bfloat16 halves the
            bases' memory and rotates in bf16; statistics and decompositions stay in factor_dtype.
        async_refresh: run each refresh after the first on its own CUDA stream, beside the next
            forward/backward, joined before the state is touched again (None: on CUDA when
            refresh_delay >= 1; True needs refresh_delay >= 1 and runs the same code inline on a
            CPU). The synchronous refresh's results: a CholeskyQR2 breakdown is redone with
            Householder QR, and failures are reported, at the next step instead of at once.
        owner_scope: where placement "owner" puts the owners under HSDP: "world" (over every rank
            of the mesh, so the state shrinks as 1/W; each step also sends every replica the update
            of its rows) or "shard_group" (repeated in each replica's shard group: nothing crosses
            replicas, the state shrinks with the shard group only). No effect elsewhere.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
        *,
        block_size: int | None = None,
        refresh_delay: int = 0,
        factor_dtype: torch.dtype = torch.float32,
        qr_method: str = "auto",
        fused: bool | None = None,
        placement: str = "auto",
        process_group: Any = None,
        device_mesh: Any = None,
        collective_timeout: float = DEFAULT_TIMEOUT_S,
        refresh_schedule: str = "all",
        basis_dtype: torch.dtype | None = None,
        async_refresh: bool | None = None,
        owner_scope: str = "world",
    ) -> None:
        check(
            is_integer(refresh_delay) and refresh_delay >= 0,
            "refresh_delay",
            refresh_delay,
            "an integer >= 0",
        )
        check_groups_and_mesh(process_group, device_mesh)
        check(factor_dtype in FACTOR_DTYPES, "factor_dtype", factor_dtype, "torch.float32 or torch.float64")
        check(
            qr_method in ("auto", "cholesky_qr2", "householder"),
            "qr_method",
            qr_method,
            "'auto', 'cholesky_qr2' or 'householder'",
        )
        defaults = dict(
            lr=lr,
            betas=as_pair(betas),
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            data_format=data_format,
            correct_bias=correct_bias,
            block_size=block_size,
        )
        validate_group(defaults)
        self.refresh_delay = refresh_delay
        self.factor_dtype = factor_dtype
        self.qr_method = qr_method
        check(fused is None or isinstance(fused, bool), "fused", fused, "None, True or False")
        self.fused = fused
        check(
            is_number(collective_timeout) and 0 < collective_timeout < math.inf,
            "collective_timeout",
            collective_timeout,
            "a finite number of seconds > 0",
        )
        self.collective_timeout = float(collective_timeout)
        check(refresh_schedule in SCHEDULES, "refresh_schedule", refresh_schedule, "'all' or 'staggered'")
        self.refresh_schedule = refresh_schedule
        check(
            basis_dtype in (None, *FACTOR_DTYPES, torch.bfloat16),
            "basis_dtype",
            basis_dtype,
            "None (factor_dtype), torch.float32, torch.float64 or torch.bfloat16",
        )
        self.basis_dtype = basis_dtype
        check_async_refresh(async_refresh, refresh_delay)
        self.async_refresh = async_refresh
        check(owner_scope in OWNER_SCOPES, "owner_scope", owner_scope, "'world' or 'shard_group'")
        self.owner_scope = owner_scope
        self._calls = 0  # step() calls, for messages that name a step
        self._held_state: tuple[int, dict[str, Any]] | None = None  # hold_state_dict's, for one call
        check_placement(placement)
        self.placement = placement
        self.process_group = process_group
        self.device_mesh = device_mesh
        self._placement: Placement | None = None
        self._exchange: Exchange | None = None
        self._engine: SoapEngine | None = None
        self._owner: OwnerRunner | None = None  # placement "owner": the runner around the engine
        self._carried_state: dict[int, dict[str, Tensor]] = {}
        self._zero_owner: Any = None  # DeepSpeed's ZeRO stage 1-3 optimizer, when it drives this one
        self._zero: ZeroRunner | None = None
        self._built_layout: list[tuple] | None = None  # the groups' layout options when state was built
        self._declared_groups: list[dict[str, Any]] = []  # the group dicts as given (DeepSpeed edits them)
        self._declared_shapes: list[tuple[int, ...]] = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._held_state = None  # a held state_dict() no longer describes this optimizer
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # (torch refuses a set itself)
            # read once: a generator ({"params": model.parameters()}) read here would reach torch empty
            params = param_group["params"] = list(params)
        listed = [params] if isinstance(params, torch.Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in listed]  # named_parameters() gives pairs
        if len({id(t) for t in tensors}) != len(tensors):  # torch only warns; SOAP would step it twice
            raise ValueError(
                "SOAP: a parameter group lists the same tensor twice; list every parameter once "
                "(torch.optim packs the repeat to one state, SOAP would keep two)"
            )
        warn_misspelt_group_keys(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:  # refused: the optimizer as it was, so that a corrected group can be added
            group["betas"] = as_pair(group["betas"])
            validate_group(group, self.refresh_delay)
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(
                        "SOAP: complex parameters are not supported; use torch.view_as_real on them"
                    )
                if p.layout != torch.strided:
                    raise TypeError(
                        f"SOAP: only dense (strided) parameters are supported, got layout {p.layout}"
                    )
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._declared_groups.append(group)
        self._declared_shapes += [tuple(getattr(p, "ds_shape", p.shape)) for p in group["params"]]
        if self._engine is not None:  # rebuilt lazily with the new group; the existing state carries over
            self._carried_from = self._engine.plan.topology.placement  # owner's engine: "owner"
            self._carried_state = (  # in state_dict()'s form: "auto" may rebuild it as another placement
                self._owner.state_dict()
                if self._owner is not None
                else save_engine_state(self._engine, self._exchange, wrapper(self._placement))
            )
            self._engine, self._owner = None, None

    # ----- layout and engine -----
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _layouts(self) -> list[ParamLayout]:
        layouts, index = [], 0
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names, strict=True):
                name = name or f"param_groups[{g}].params[{index}]"
                layouts.append(plan_in_group(index, g, name, tuple(p.shape), group))
                index += 1
        return layouts

    def _ensure_engine(self) -> SoapEngine:
        params = self._params()
        if self._engine is not None and self._engine_params == [id(p) for p in params]:
            return self._engine
        if self._engine is not None:
            raise RuntimeError(
                "SOAP: the parameters changed after the optimizer state was built; rebuild the optimizer "
                "(or let Accelerate/FSDP swap parameters before the first step)"
            )
        full = self._layouts()
        names = [lay.name for lay in full]
        if self._looks_like_zero_partitions(full):
            raise RuntimeError(
                "SOAP: the parameters it is stepping are not the ones it was built with (DeepSpeed ZeRO "
                "stages 1-3 hand over flat partitions), and no ZeRO optimizer was found driving it. Create "
                "it through soap_dist.deepspeed.initialize (docs/deepspeed.md), with deepspeed=="
                "0.19.8, or use ZeRO stage 0."
            )
        self._placement = resolve(params, names, self.placement, self.process_group, self.device_mesh)
        topology = self._placement.topology
        if self.placement == "owner":
            return self._build_owner(full, params)
        plan = build_plan(full, topology)
        sharded = topology.placement in ("fsdp-local", "hsdp")
        if self.placement == "auto" and sharded and self._owner_pays(plan):
            return self._build_owner(full, params)
        self._exchange = None
        local_params = [local(p) for p in params]
        if topology.world > 1:
            device = local_params[0].device if local_params else torch.device("cpu")
            self._exchange = self._new_exchange(plan, self._placement.groups, device)
            self._check_plan(self._exchange, full, self.param_groups, params=params)
        self._engine = self._new_engine(local_layouts(full, topology), local_params, plan, self._exchange)
        self._engine_params = [id(p) for p in params]
        self._stateful_markers(params, full)
        self._load_carried(lambda: load_engine_state(self._engine, self._carried_state, partial=True))
        return self._engine

    def _owner_pays(self, sharded_plan: Any) -> bool:
        """``placement="auto"``'s rule (docs/design.md, section 6): owner unless fsdp-local would equal
        one process (``block_size`` divides every shard's rows) and hold no more column statistics and
        bases on a rank than its shard of the parameters."""
        factor_bytes = torch.empty((), dtype=self.factor_dtype).element_size()
        return prefers_owner(sharded_plan, factor_bytes, [p.element_size() for p in self._params()])

    def _build_owner(self, full: list[ParamLayout], params: list[Tensor]) -> SoapEngine:
        self._owner = OwnerRunner(self, full, params, self._placement)
        self._engine, self._exchange = self._owner.engine, self._owner.exchange
        self._engine_params = [id(p) for p in params]
        self._stateful_markers(params, full)
        self._load_carried(lambda: self._owner.load_state_dict(self._carried_state, partial=True))
        return self._engine

    def _new_exchange(self, plan: Any, groups: Any, device: torch.device) -> Exchange:
        exchange = Exchange(plan, groups, self.factor_dtype, device, self.collective_timeout)
        exchange.step = self._calls
        return exchange

    _check_plan = check_first_step  # (self, exchange, layouts, groups, across=None, params=None)

    def _new_engine(
        self,
        layouts: list[ParamLayout],
        params: list[Tensor],
        plan: Any,
        exchange: Exchange | None,
        writes_updates: bool | Sequence[bool] = False,
    ) -> SoapEngine:
        return SoapEngine(
            layouts,
            params,
            factor_dtype=self.factor_dtype,
            refresh_delay=self.refresh_delay,
            qr_method=self.qr_method,
            fused=self.fused,
            plan=plan,
            exchange=exchange,
            refresh_schedule=self.refresh_schedule,
            basis_dtype=self.basis_dtype,
            async_refresh=async_refresh_on(self.async_refresh, self.refresh_delay, params),
            writes_updates=writes_updates,
        )

    # ----- torch.optim contract -----
    # Eager under torch.compile: the step plans, talks to other ranks and keeps Python-side state that
    # Dynamo would not replay (a compiled step did nothing, silently); its elementwise core is compiled
    # on its own (``fused``).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        devices = {"cpu"} | {p.device.type for p in self._params()}
        with autocast_off(devices):  # the closure above runs in the caller's autocast, the step never
            self._step()
        return loss

    def _step(self) -> None:
        self._calls += 1
        self._held_state = None  # hold_state_dict's copy describes the state before this step
        zero = self._zero_mode()
        if zero is not None:
            zero.exchange.step = self._calls
            with zero.engine.stepping():
                for f in zero.flats_in(self.param_groups):
                    g = zero.part.flat_group[f]
                    validate_stepped_group(zero.groups[g], g, self.refresh_delay)
                    zero.step(f)
            return
        params = self._params()
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("SOAP: sparse gradients are not supported (e.g. nn.Embedding(sparse=True))")
            if not p.is_floating_point() or not p.grad.is_floating_point():
                raise TypeError(
                    f"SOAP: parameter {i} (shape {tuple(p.shape)}, dtype {p.dtype}) has a gradient of dtype "
                    f"{p.grad.dtype}; SOAP steps floating-point parameters only: make it a float tensor, or "
                    "leave it out of the optimizer"
                )
        for g, group in enumerate(self.param_groups):
            validate_stepped_group(group, g, self.refresh_delay)
        built = self._built_layout if self._engine is not None else None
        self._built_layout = check_layout_unchanged(self.param_groups, built)
        engine = self._ensure_engine()
        if self._exchange is not None:
            self._exchange.step = self._calls
        active = [p.grad is not None and p.numel() > 0 for p in params]
        warn_if_never_a_gradient(self.__dict__, params, active)
        runner = self._owner if self._owner is not None else engine
        with engine.stepping():  # a raise that leaves the ranks apart: refuse later steps, tell the others
            runner.step(
                self.param_groups, [local(p) for p in params], [local(p.grad) for p in params], active
            )

    # ----- DeepSpeed ZeRO stages 1-3 (soap_dist.deepspeed) -----
    def _looks_like_zero_partitions(self, full: list[ParamLayout]) -> bool:
        """One flat 1-D tensor per group where other shapes were declared: ZeRO's signature."""
        return (
            "deepspeed" in sys.modules
            and [lay.shape for lay in full] != self._declared_shapes
            and all(len(g["params"]) <= 1 for g in self.param_groups)
            and all(len(lay.shape) == 1 for lay in full)
        )

    def bind_zero(self, zero_optimizer: Any) -> None:
        """Tie this optimizer to the DeepSpeed ZeRO optimizer that drives it (None: stage 0)."""
        self._zero_owner = zero_optimizer

    def _zero_mode(self) -> ZeroRunner | None:
        """The runner for ZeRO's flat partitions, built at the first call from DeepSpeed; else None."""
        if self._zero is not None:
            return self._zero
        if self._zero_owner is None:
            if self._engine is not None or "deepspeed" not in sys.modules:
                return None
            from .integrations.deepspeed_zero import find_zero_optimizer

            self._zero_owner = find_zero_optimizer(self)
            if self._zero_owner is None:
                return None
        from .integrations.deepspeed_zero import partitioning

        part = partitioning(self._zero_owner)
        if self.placement not in ("auto", "zero", "owner"):
            raise ValueError(
                f"SOAP: placement={self.placement!r}, but DeepSpeed ZeRO partitions the parameters; use "
                "placement='auto' (row blocks stay where ZeRO put most of them) or 'owner' (each matrix "
                "whole at one rank: exact, state 1/W)"
            )
        self._zero = ZeroRunner(self, part, list(self._declared_groups))
        self._stateful_markers(part.flats)
        return self._zero

    def _stateful_markers(self, params: list[Tensor], layouts: list[ParamLayout] | None = None) -> None:
        """Entries in ``self.state`` that say the state lives in the engine. torch.optim and DCP read a
        non-empty ``state`` as "already initialised"; DCP's flatten_optimizer_state_dict=True rebuilds
        each entry on load from these entries' key names, so they name the keys state_dict() saves."""
        staggered = ["refresh_phase"] if self.refresh_schedule == "staggered" else []
        for k, p in enumerate(params):
            keys = ["managed_by"]  # ZeRO's flat partitions: DCP never sees them
            if layouts is not None:
                keys = saved_keys(layouts[k].preconditioned, self.refresh_delay) + staggered
            self.state[p] = dict.fromkeys(keys, "soap_dist engine; see SOAP.state_dict()")
