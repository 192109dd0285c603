"""Checks of a loaded SOAP state, so a corrupt checkpoint fails at load instead of training on.

A byte-corrupted shard can load without error and poison the run (an exp_avg off by 1e103 trained
on). These are cheap necessary conditions of any state the optimizer writes: every value finite,
``exp_avg_sq >= 0``, and every basis orthogonal. Pure functions on tensors (a DTensor is checked
through its local shard); nothing here uses torch.distributed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .qr import accurate_gram, accurate_matmul

if TYPE_CHECKING:
    from .engine import SoapEngine

Tensor = torch.Tensor
ORTHOGONALITY_TOL = 1e-2  # a QR/eigh basis is orthogonal to ~1e-5 even in float32; corruption is O(1)
BF16_TOL = 6e-2  # bases stored in bf16 (8-bit mantissa): rounding alone reaches ~1e-2 on large probes
FULL_CHECK_DIM = 256  # up to this size Q^T Q is formed; above, Q^T Q v = v is probed
PROBES = 4
_BASIS = re.compile(r"(pending_)?basis_(\d+)$")


# Why a sound state's row blocks may not be this optimizer's (a load of another block layout)
OTHER_ROW_BLOCKS = (
    "the state's row blocks differ from this optimizer's: another block_size, or fsdp-local/hsdp whose "
    "row blocks are the shards (block_size=None) or are cut at them (a block_size that does not divide "
    "every shard's rows), whose state loads only into the same placement at the same world size "
    "(docs/design.md, section 5, Resharding)"
)


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _corrupt(label: str, key: str, problem: str) -> ValueError:
    return ValueError(
        f"SOAP.load_state_dict: the checkpoint is corrupt: {key} of {label} {problem}; "
        "load an earlier checkpoint"
    )


def entry_of(state: Mapping[Any, Mapping[str, Any]], index: int) -> Any:
    """A parameter's saved entry, keyed by its index (torch.optim) or the index as text; None if absent."""
    return state.get(index, state.get(str(index)))


def required_keys(preconditioned: Sequence[bool]) -> list[str]:
    """The keys every SOAP entry holds from the first step on, for a tensor with these preconditioned dims."""
    keys = ["step", "exp_avg", "exp_avg_sq"]
    for j, pre in enumerate(preconditioned):
        keys += [f"factor_{j}", f"basis_{j}"] if pre else []
    return keys


def saved_keys(preconditioned: Sequence[bool], refresh_delay: int) -> list[str]:
    """The keys state_dict() writes for a tensor (without refresh_phase, which "staggered" adds)."""
    keys = ["initialized", *required_keys(preconditioned)]
    if refresh_delay:
        for j, pre in enumerate(preconditioned):
            keys += [f"pending_basis_{j}", f"pending_perm_{j}", f"pending_ok_{j}"] if pre else []
        keys.append("install_step")
    return keys


def orthogonality_error(q: Tensor) -> Tensor:
    """How far a square ``q`` is from orthogonal (NaN if it is not finite), as a 0-d tensor.

    max |Q^T Q - I| for d <= FULL_CHECK_DIM. Above, O(d^2) work instead of d^3: every column's
    |q_j^T q_j - 1|, and max |Q^T Q v - v| over a few fixed N(0, 1) probes v (an entry e of Q^T Q - I
    shows as about e |v_k|, rounding as ~eps sqrt(d)).
    """
    d = q.shape[-1]
    if d <= FULL_CHECK_DIM:
        gram = accurate_gram(q[None])[0]
        gram.diagonal().sub_(1.0)
        return gram.abs().amax()
    columns = (torch.linalg.vector_norm(q, dim=-2).square() - 1.0).abs().amax()
    gen = torch.Generator(device=q.device).manual_seed(0)
    v = torch.randn(1, d, PROBES, generator=gen, dtype=q.dtype, device=q.device)
    back = accurate_matmul(q.mT[None], accurate_matmul(q[None], v))
    return torch.maximum(columns, (back - v).abs().amax())


def _check_blocks(
    label: str, key: str, blocks: list[tuple[str, Tensor]], tolerance: float = ORTHOGONALITY_TOL
) -> None:
    """Every block finite and orthogonal; exactly-zero blocks are absent (a rank holding nothing)."""
    square = [(where, q) for where, q in blocks if q.numel() and q.shape[-2] == q.shape[-1]]
    if not square:
        return
    held = torch.stack([q.any() for _, q in square]).tolist()
    present = [block for block, keep in zip(square, held, strict=True) if keep]
    if not present:
        return
    errors = torch.stack([orthogonality_error(q) for _, q in present]).float()
    bad = (~(errors <= tolerance)).nonzero().flatten().tolist()  # with ``held``: two host syncs per key
    if bad:
        where, q = present[bad[0]]
        if not bool(torch.isfinite(q).all()):
            raise _corrupt(label, key, f"holds NaN or Inf values{where}")
        problem = f"is not an orthogonal basis{where} (|Q^T Q - I| ~ {errors[bad[0]].item():.3g})"
        if "row block" in where:  # a sound checkpoint read through other row blocks looks the same
            raise ValueError(
                f"SOAP.load_state_dict: {key} of {label} {problem}: {OTHER_ROW_BLOCKS}; or the checkpoint "
                "is corrupt"
            )
        raise _corrupt(label, key, problem)


def check_entry(
    entry: Mapping[str, Any],
    label: str,
    row_blocks: Sequence[tuple[int, int]] = (),
    tolerance: float = ORTHOGONALITY_TOL,
) -> None:
    """Raise ValueError naming ``label`` and the key if one parameter's saved state is corrupt.

    ``row_blocks`` are the (first row, size) of the row blocks in ``basis_0``'s rows: block r sits in
    rows [r0, r0 + n_r) and columns [0, n_r). A pending basis is checked only where its ok flag is
    set: a failed refresh may leave any values there, and they are never installed.
    """
    for key, value in entry.items():
        t = _local(value)
        if not isinstance(t, Tensor) or _BASIS.match(key):
            continue
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _corrupt(label, key, "holds NaN or Inf values")
        if key == "exp_avg_sq" and bool((t < 0).any()):
            raise _corrupt(label, key, "holds negative values (a second moment is never negative)")
    for key, value in entry.items():
        match = _BASIS.match(key)
        t = _local(value)
        if match is None or not isinstance(t, Tensor):
            continue
        pending, j = match.group(1) is not None, int(match.group(2))
        ok = _local(entry.get(f"pending_ok_{j}")) if pending else None
        flags = [f > 0.5 for f in ok.reshape(-1).tolist()] if isinstance(ok, Tensor) else []
        if j >= 1:
            if not pending or (flags and flags[0]):
                _check_blocks(label, key, [("", t)], tolerance)
            continue
        blocks = []
        for r0, n in row_blocks:
            if pending and not (r0 < len(flags) and flags[r0]):
                continue
            # "row block" only where there are several: only then can other row blocks be the cause
            what = "row block at rows" if len(row_blocks) > 1 else "rows"
            blocks.append((f" ({what} {r0}..{r0 + n - 1})", t[r0 : r0 + n, :n]))
        _check_blocks(label, key, blocks, tolerance)


def check_engine_state(engine: SoapEngine, state: Mapping[Any, Mapping[str, Any]]) -> None:
    """check_entry for every parameter of a SoapEngine that ``state`` holds, before anything is copied.

    Row blocks are where load_engine_state reads them: the rank's own blocks when row factors stay
    with their shard (one replica, several shards), else every block of the full tensor (identical on
    every rank, so every rank reaches the same verdict).
    """
    plan = engine.plan
    tolerance = BF16_TOL if engine.basis_dtype == torch.bfloat16 else ORTHOGONALITY_TOL
    rows_sharded = plan.topology.replicas == 1 and plan.topology.shards > 1  # as state_io._rows_sharded
    blocks: dict[int, list[tuple[int, int]]] = {}
    if rows_sharded:
        for e in engine.entry_slot:
            if e.dim == 0:
                blocks.setdefault(e.param, []).append((engine.layouts[e.param].row_offsets[e.block], e.size))
    else:
        for e in plan.entries:
            if e.dim == 0:
                blocks.setdefault(e.param, []).append((plan.row_start(e), e.size))
    for lay in engine.layouts:
        entry = entry_of(state, lay.index)
        if entry is not None:
            label = f"parameter {lay.index} ({lay.name})"
            check_entry(entry, label, sorted(blocks.get(lay.index, [])), tolerance)


def check_saved_shapes(layouts: Sequence[Any], state: Mapping[Any, Mapping[str, Any]]) -> None:
    """Raise ValueError if a saved entry is not SOAP's for these shapes and options, before any value
    is read: a state of another optimizer (AdamW's has no factors) or of other shapes is named as
    such, not as corrupt. ``layouts``: the whole parameters' (global shapes, as the entries' DTensors)."""
    for lay in layouts:
        entry = entry_of(state, lay.index)
        if entry is None:
            continue
        label = f"parameter {lay.index} ({lay.name}, shape {tuple(lay.shape)})"
        lacking = [k for k in required_keys(lay.preconditioned) if k not in entry]
        if lacking:
            raise ValueError(
                f"SOAP.load_state_dict: the saved state of {label} has no {', '.join(lacking)}: it is not "
                "a SOAP state for these options (another optimizer's, such as AdamW's, or SOAP's with other "
                "max_precond_dim, precondition_1d or merge_dims)"
            )
        block = tuple(lay.block_shape)
        expected = {"exp_avg": block, "exp_avg_sq": block}
        for j, pre in enumerate(lay.preconditioned):
            if pre and j >= 1:
                expected |= {f"factor_{j}": (block[j], block[j]), f"basis_{j}": (block[j], block[j])}
        for key, shape in expected.items():
            if tuple(entry[key].shape) != shape:
                raise ValueError(
                    f"SOAP.load_state_dict: {key} of {label} has shape {tuple(entry[key].shape)}, expected "
                    f"{shape}: the state was saved for another model or other options"
                )
        if lay.preconditioned and lay.preconditioned[0]:
            for key in ("factor_0", "basis_0"):
                if entry[key].shape[0] != block[0]:
                    raise ValueError(
                        f"SOAP.load_state_dict: {key} of {label} has {entry[key].shape[0]} rows, expected "
                        f"{block[0]}: the state was saved for another model or other options"
                    )
