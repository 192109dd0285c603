"""What SOAP reports and saves: ``stats()``, ``state_dict()`` and ``load_state_dict()``.

A mixin of ``soap_dist.SOAP`` (optimizer.py), split out so that each file holds one idea. Saving is
a collective under every distributed placement: each rank must call it (checked through the store
first, so a call on one rank fails with a message instead of colliding with DDP's all-reduce).
Loading validates the state (``state_check``) and, when any rank refuses it, every rank raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .comm.guard import CollectiveTimeout
from .idle import callers_level
from .options import WHOLE_OPTIMIZER_DEFAULTS, adopt_saved_group
from .placements import wrapper
from .placements.zero import ZeroRunner
from .state_check import check_saved_shapes
from .state_io import check_loadable, load_engine_state, save_engine_state

# what copy.deepcopy and pickle carry beside torch.optim's state: the whole-optimizer options (not the
# process groups, which cannot travel) and the step count
COPIED = (*(k for k in WHOLE_OPTIMIZER_DEFAULTS if k not in ("process_group", "device_mesh")), "_calls")
COPIED_DEFAULTS: dict[str, Any] = {**WHOLE_OPTIMIZER_DEFAULTS, "_calls": 0}
# what a load replaces: kept, and put back when the load is refused
LOAD_REPLACES = (
    "_engine",
    "_owner",
    "_exchange",
    "_placement",
    "_engine_params",
    "_held_state",
    "_carried_state",
)


class StateMixin:
    """``stats``, ``state_dict`` and ``load_state_dict`` of ``SOAP`` (see optimizer.py for the attributes)."""

    def stats(self) -> dict[str, Any]:
        """Counters of what the optimizer did on this rank: refreshes, installs, failures, time, bytes.

        Before the first ``step()`` only ``{"built": False}``. Then ``built`` is True, and:

        - ``refreshes``: refresh rounds this rank took part in (the first call's eigendecompositions
          excluded); ``factors_refreshed``: factors it decomposed in them (it owns them);
          ``factors_owned``: factors it owns; ``owned_refresh_cost``: their cost, sum of d^3;
        - ``bases_installed``: refreshed bases put into use (a failed refresh keeps its old basis and
          counts in ``refresh_failures``); ``installed_at``: (parameter, first step using the new
          basis) of the most recent ``engine.INSTALLED_AT_KEPT`` (4096) installs only;
          ``nonfinite_params_warned``: parameters skipped for a non-finite gradient and warned about;
        - ``refresh_seconds``: host seconds in refreshes after the first call, of which
          ``owner_seconds`` in this rank's own decompositions; ``eigh_seconds``: the first call's
          eigendecompositions; ``refresh_side_stream_seconds``: the asynchronous refresh's span on
          its CUDA stream;
        - ``placement``, ``world``, ``rank``: where it runs (``world``: the data-parallel world);
        - ``factor_bytes``, ``basis_bytes``, ``moment_bytes``, ``stash_bytes``: the state it holds
          (``stash_bytes``: bases waiting for their install step under refresh_delay >= 1);
        - ``bytes_sent``, ``bytes_received``, ``collectives``: SOAP's own traffic so far;
        - ``spread_params``, ``owner_grid``: under placement owner, the parameters left spread over
          the ranks and the (replicas, shards) its owners span.
        """
        zero = self._zero
        engine, exchange = (zero.engine, zero.exchange) if zero else (self._engine, self._exchange)
        if engine is None:
            return {"built": False}
        engine.report_nonfinite()  # skipped gradients are counted (and named) now, not at the next refresh
        c = engine.counters
        plan = engine.plan
        me = plan.topology.rank
        owned = [e for e in plan.entries if e.owner == me]
        stores = list(engine.stores.values())
        traffic = exchange.traffic if exchange is not None else None
        return {
            "built": True,
            "refreshes": c.refreshes,
            "factors_refreshed": c.factors_refreshed,
            "factors_owned": len(owned),
            "owned_refresh_cost": sum(e.cost for e in owned),
            "bases_installed": c.bases_installed,
            "refresh_failures": c.refresh_failures,
            "nonfinite_params_warned": c.nonfinite_params_warned,
            "refresh_seconds": c.refresh_seconds,
            "eigh_seconds": c.eigh_seconds,
            "refresh_side_stream_seconds": c.side_stream_seconds,
            "installed_at": list(c.installed_at),
            "owner_seconds": c.owner_seconds,
            "placement": engine.plan.topology.placement,
            # the data-parallel world (under owner with HSDP the engine's grid is one shard group)
            "world": self._placement.topology.world if self._placement else engine.plan.topology.world,
            "rank": self._placement.topology.rank if self._placement else engine.plan.topology.rank,
            "factor_bytes": sum(s.factors.numel() * s.factors.element_size() for s in stores),
            "basis_bytes": sum(s.bases.numel() * s.bases.element_size() for s in stores),
            "moment_bytes": sum(
                t.numel() * t.element_size() for st in engine.stacks for t in (st.exp_avg, st.exp_avg_sq)
            ),
            # refresh_delay >= 1: the bases waiting for their install step (a second copy, kept)
            "stash_bytes": sum(
                t.numel() * t.element_size() for p in engine.pending.values() for t in (p.bases, p.perm, p.ok)
            ),
            "bytes_sent": traffic.sent if traffic else 0,
            "bytes_received": traffic.received if traffic else 0,
            "collectives": (traffic.reduce_calls + traffic.broadcast_calls + traffic.small_calls)
            if traffic
            else 0,
            # placement owner: the parameters left spread over the ranks (docs/design.md, 9)
            "spread_params": [lay.name for lay, s in zip(runner.layouts, runner.spread, strict=True) if s]
            if (runner := self._owner or zero) is not None
            else [],
            # placement owner: the (replicas, shards) its owners span (HSDP: owner_scope decides)
            "owner_grid": [self._owner.replicas, self._owner.shards] if self._owner is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout ({"state", "param_groups"}), with its state_dict hooks run."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        out = self._state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def hold_state_dict(self, keep: bool = True) -> None:
        """Run ``state_dict()``'s collective now, on every rank; where ``keep``, hold the result for this
        rank's next ``state_dict()`` call before the next step, which then needs no other rank.

        For code that calls ``state_dict()`` on the saving rank only: the HF Trainer under DDP does, and
        ``soap_dist.integrations.hf_trainer.save_callback()`` calls this on every rank first. Only the
        ranks that kept may then call ``state_dict()`` (a rank that did not keep would wait in the
        collective for them). The held state costs its memory until it is taken or the next step;
        ranks that will not save pass ``keep=False``. One process needs none of this (its
        state_dict() is local), and does nothing.
        """
        self._held_state = None
        if self._exchange is None and self._zero_mode() is None:  # (ZeRO's runner is built at first use)
            return
        held = (self._calls, self._state_dict())  # torch's state_dict hooks run at the call that takes it
        self._held_state = held if keep else None

    def _state_dict(self) -> dict[str, Any]:
        held, self._held_state = self.__dict__.get("_held_state"), None
        if held is not None and held[0] == self._calls:  # hold_state_dict ran on every rank, no step since
            return held[1]
        zero = self._zero_mode()
        if zero is not None:  # each rank saves its own rows, as DeepSpeed saves each rank's partition
            zero.exchange.arrive("SOAP.state_dict()")
            return {
                "state": zero.state_dict(),
                "param_groups": self._packed_groups(self._declared_groups, zero.param_counts()),
                "zero_world": zero.part.world,
                "zero_placement": zero.placement_name,
            }
        groups = self._packed_groups(self.param_groups, [len(g["params"]) for g in self.param_groups])
        if self._exchange is not None:  # a collective: every rank must be here (checked before any)
            self._exchange.arrive("SOAP.state_dict()")
        if self._engine is None and self._carried_state:  # after add_param_group (or in a copy), before
            self._ensure_engine()  # a step: the state waits to be loaded into the engine, built now
        if self._owner is not None:
            state = self._owner.state_dict()
        elif self._engine is not None:
            state = save_engine_state(self._engine, self._exchange, wrapper(self._placement))
        else:
            state = {}
        params = {id(p) for g in self.param_groups for p in g["params"]}
        for key, value in self.state.items():  # entries a user or a wrapper keyed by something else
            if not (torch.is_tensor(key) and id(key) in params):
                state[key] = value
        return {"state": state, "param_groups": groups}

    @staticmethod
    def _packed_groups(groups: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
        out, index = [], 0
        for group, n in zip(groups, counts, strict=True):
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(index, index + n))
            index += n
            out.append(packed)
        return out

    def _load_zero_state(self, zero: ZeroRunner, state_dict: dict[str, Any]) -> None:
        saved_world = state_dict.get("zero_world")
        if saved_world is None:
            raise ValueError(
                "SOAP.load_state_dict: this state was not saved under DeepSpeed ZeRO stages 1-3 (it holds "
                "whole parameters' state, as a stage-0, DDP, FSDP2 or one-process run saves it), and ZeRO "
                "stages 1-3 need each rank's own rows. Resume at the stage and setup that saved it, "
                "or load the weights only (DeepSpeed: load_optimizer_states=False) and start SOAP afresh"
            )
        saved_placement = state_dict.get("zero_placement", zero.placement_name)  # absent before 2026-12
        if saved_placement != zero.placement_name:
            raise ValueError(
                f"SOAP.load_state_dict: this state was saved with placement {saved_placement!r} under ZeRO, "
                f"and this optimizer runs {zero.placement_name!r}; each rank's rows differ between the two. "
                f'Resume with "placement": "{"auto" if saved_placement == "zero" else saved_placement}" in '
                "the SOAP params"
            )
        if saved_world != zero.part.world:
            raise ValueError(
                f"SOAP.load_state_dict: this state was saved under DeepSpeed ZeRO at world {saved_world}; "
                f"loading it at world {zero.part.world} is not supported (SOAP's row-block state follows "
                "the partition boundaries). Resume at the same data-parallel size."
            )
        for group, saved in zip(self._declared_groups, state_dict["param_groups"], strict=True):
            adopt_saved_group(group, saved, self.refresh_delay)
        state = state_dict["state"]
        if state:  # loaded in place: every rank agrees on the checks before anything is copied
            self._agreed(lambda: check_loadable(zero.engine, state), zero.exchange)
            self._agreed(lambda: zero.load_state_dict(state, checked=True), zero.exchange)  # a backstop

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what ``state_dict`` gave (any world size the placement allows), with torch's hooks run."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict is None:  # DeepSpeed stage 0 passes None for a checkpoint with no optimizer state
            raise ValueError(
                "SOAP.load_state_dict: got None instead of an optimizer state. DeepSpeed passes None where "
                "the checkpoint holds no optimizer state for this stage: one saved under ZeRO stages 1-3 "
                "keeps it in its zero_pp_rank_* files, which stage 0 does not read. Load it at the stage "
                "that saved it, or with load_optimizer_states=False to start SOAP afresh from its weights"
            )
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            got = sorted(state_dict)[:8] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                "SOAP.load_state_dict: expected an optimizer state_dict with 'state' and 'param_groups' "
                f"(got {got}); pass what SOAP.state_dict() (or DCP's get_optimizer_state_dict) returned"
            )
        if not state_dict["state"] and any(p.grad is not None for p in self._params()):
            warnings.warn(
                "SOAP.load_state_dict: the state holds no parameter's state, so SOAP goes on as if new "
                "(factors, bases and moments from zero), while gradients are set: with "
                "torch.distributed.checkpoint, a template taken by get_state_dict while gradients are set "
                "holds no optimizer state and loads none. Take the template before any backward",
                stacklevel=callers_level(),
            )
        with self._unchanged_if_refused():
            self._load_checked(_without_unfilled(state_dict))

    @contextmanager
    def _unchanged_if_refused(self) -> Iterator[None]:
        """A refused load leaves the optimizer as it was: its groups' hyperparameters, its state and
        its engine (a load builds a new one), so a caller that catches the error trains on unharmed.
        Every rank refuses alike (``_agreed``), so every rank puts back the same. An engine with nothing
        started (DCP's set_optimizer_state_dict builds one with a zero-gradient step first) is not kept:
        it holds nothing to put back, and keeping it would double the optimizer's memory during the
        load. Under DeepSpeed ZeRO the engine is loaded in place, so there the ranks agree on the checks
        (``check_loadable``) before anything is copied."""
        kept = {k: self.__dict__[k] for k in LOAD_REPLACES if k in self.__dict__}
        if kept.get("_engine") is not None and not any(kept["_engine"].started):
            kept.update(_engine=None, _owner=None)
        groups = {id(g): g for g in [*self.param_groups, *self.__dict__.get("_declared_groups", [])]}
        before = {i: dict(g) for i, g in groups.items()}
        state = dict(self.state)
        try:
            yield
        except BaseException:
            self.__dict__.update(kept)
            for i, group in groups.items():
                group.clear()
                group.update(before[i])
            self.state.clear()
            self.state.update(state)
            raise

    def _load_checked(self, state_dict: dict[str, Any]) -> None:
        zero = self._zero_mode()
        if zero is not None or "zero_world" in state_dict:
            if zero is None:
                raise ValueError(
                    "SOAP.load_state_dict: this state was saved under DeepSpeed ZeRO stages 1-3; load it "
                    "through the DeepSpeed engine (engine.load_checkpoint) of the same configuration"
                )
            self._load_zero_state(zero, state_dict)
            return
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"SOAP.load_state_dict: the state has {len(saved_groups)} param groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("SOAP.load_state_dict: a param group's size differs from the saved one")
            adopt_saved_group(group, saved, self.refresh_delay)
        # Saved params are ids (torch.optim) or FQNs (DCP's set_optimizer_state_dict): map by position.
        by_saved_id: dict[Any, int] = {}
        index = 0
        for saved in saved_groups:
            for saved_id in saved["params"]:
                by_saved_id[saved_id] = index
                index += 1
        state: dict[int, Any] = {}
        for key, value in state_dict["state"].items():
            index = by_saved_id.get(key)
            if index is None and isinstance(key, str) and key.isdigit():  # ids written out as text
                index = by_saved_id.get(int(key))
            if index is None:  # not a parameter's entry: back into self.state as it was
                self.state[key] = value
            else:
                state[index] = value
        layouts = self._layouts()
        check_saved_shapes(layouts, state)  # the same verdict on every rank: global shapes only
        params = self._params()
        fresh = [
            lay.name
            for lay, p in zip(layouts, params, strict=True)
            if lay.index not in state and p.requires_grad
        ]
        if self._engine is not None:
            self._engine.before_drop()  # (kept, and used again, if the load is refused)
        self._engine, self._owner = None, None
        self._held_state = None
        self._carried_state = {}  # a copy's or an added group's state: the loaded state replaces it
        if state:
            engine = self._ensure_engine()
            # A parameter the state has no entry for starts afresh, as in torch.optim (DCP leaves out
            # frozen parameters' entries).
            self._agreed(
                lambda: (
                    self._owner.load_state_dict(state, partial=True)
                    if self._owner
                    else load_engine_state(engine, state, partial=True)
                ),
                self._exchange,
            )
            self._warn_fresh(fresh)

    @staticmethod
    def _warn_fresh(names: list[str]) -> None:
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            warnings.warn(
                f"SOAP.load_state_dict: the state has no entry for {len(names)} trainable parameters "
                f"({shown}); they start afresh, as in torch.optim",
                stacklevel=callers_level(),
            )

    def _load_carried(self, load: Callable[[], None]) -> None:
        """Load the state carried over a rebuild, with one verdict on every rank; if it does not fit, the
        engine is dropped and the state kept, so a retried step raises again instead of starting every
        parameter afresh."""
        if not self._carried_state:
            return
        now = self._engine.plan.topology.placement
        before = self.__dict__.get("_carried_from")
        try:
            self._agreed(load, self._exchange)
        except BaseException as error:
            self._engine, self._owner = None, None
            if isinstance(error, ValueError) and before not in (None, now):
                raise ValueError(
                    f"SOAP: after add_param_group, placement='auto' picks {now!r} for the new set of "
                    f"parameters, and the state held under {before!r} does not move there ({error}); pass "
                    f"placement={before!r} to keep it"
                ) from error
            raise
        self._carried_state = {}

    def _agreed(self, load: Callable[[], None], exchange: Any) -> None:
        """Run ``load``; if it refuses the state on any rank (a corrupt shard is seen only where it is
        held), every rank raises, naming what each rank found, instead of the others going on."""
        error = None
        try:
            load()
        except CollectiveTimeout:  # the ranks are already apart: nothing more can be agreed
            raise
        except Exception as found:
            if not isinstance(found, ValueError):
                found = ValueError(f"SOAP.load_state_dict: the state does not fit this optimizer ({found!r})")
            if exchange is None:
                raise found from None
            error = str(found)
        if exchange is None:
            return
        every = exchange.gather_objects(error)
        bad = [(r, e) for r, e in enumerate(every) if e]
        if bad:
            if error:
                raise ValueError(error)
            raise ValueError(
                "SOAP.load_state_dict: other ranks refused the checkpoint: "
                + "; ".join(f"rank {r}: {e}" for r, e in bad)
            )

    def __getstate__(self) -> dict[str, Any]:
        """copy.deepcopy, pickle and torch.save(opt): the options and, once built, the whole state."""
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in COPIED})
        state["_held_state"] = None
        if self._engine is not None or self._zero is not None:
            if self._exchange is not None or self._zero is not None:
                raise TypeError(
                    "SOAP: a distributed optimizer cannot be copied or pickled (its process groups and "
                    "sharded state cannot travel); save it with state_dict() on every rank instead"
                )
            state["_soap_state"] = {
                k: v for k, v in self._state_dict()["state"].items() if isinstance(k, int)
            }
        elif self._carried_state:  # after add_param_group, before the step that rebuilds the engine
            if self._exchange is not None:
                raise TypeError(
                    "SOAP: a distributed optimizer cannot be copied or pickled; save it with state_dict() "
                    "on every rank instead"
                )
            state["_soap_state"] = dict(self._carried_state)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        carried = state.pop("_soap_state", {})
        super().__setstate__(state)
        self.__dict__.setdefault("_engine", None)
        self.__dict__.setdefault("_owner", None)
        self.__dict__["_carried_state"] = carried  # loaded when the engine is built, at the next step
        for key, value in COPIED_DEFAULTS.items():
            self.__dict__.setdefault(key, value)
        self.__dict__.setdefault("_exchange", None)
        self.__dict__.setdefault("_placement", None)
        self.__dict__.setdefault("_zero_owner", None)
        self.__dict__.setdefault("_zero", None)
        self.__dict__.setdefault("_built_layout", None)
        self.__dict__.setdefault("_held_state", None)
        self.__dict__.setdefault("_declared_groups", list(self.param_groups))
        self.__dict__.setdefault(
            "_declared_shapes", [tuple(p.shape) for g in self.param_groups for p in g["params"]]
        )


def _without_unfilled(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the ``{}`` values DCP's flatten_optimizer_state_dict=True leaves for keys
    named in ``self.state`` that the checkpoint lacks (an older one without refresh_phase): missing keys."""
    state = state_dict["state"]
    if not isinstance(state, dict):
        return state_dict

    def filled(entry: Any) -> Any:
        if not isinstance(entry, dict):
            return entry
        return {k: v for k, v in entry.items() if not (isinstance(v, dict) and not v)}

    return {**state_dict, "state": {key: filled(entry) for key, entry in state.items()}}
