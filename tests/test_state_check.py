"""A corrupt checkpoint fails at load (naming the parameter and the key), a sound one still loads."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import gradient_stream

from soap_dist import SOAP
from soap_dist.state_check import FULL_CHECK_DIM, check_entry, orthogonality_error

SHAPES = [(6, 5), (4, 3, 2)]


def _trained(**kw):
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = SOAP(params, precondition_frequency=2, fused=False, **kw)
    for grads in gradient_stream(SHAPES, 3):  # a refresh at step 2; with refresh_delay=1 it waits
        for p, g in zip(params, grads, strict=True):
            p.grad = g.float()
        opt.step()
    return params, opt


def _load(params, state):
    fresh = SOAP(
        [torch.nn.Parameter(p.detach().clone()) for p in params], precondition_frequency=2, fused=False
    )
    fresh.load_state_dict(state)
    return fresh


def _random_basis(t):
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(5), dtype=t.dtype) + 1.0


CORRUPTIONS = {
    "exp_avg nan": ("exp_avg", lambda t: t.index_put_((torch.tensor([0]),), torch.tensor(float("nan")))),
    "exp_avg times 1e103": ("exp_avg", lambda t: t.mul_(1e103)),  # float32: every nonzero value is inf
    "factor inf": ("factor_1", lambda t: t.view(-1)[3].fill_(float("inf"))),
    "negative exp_avg_sq": ("exp_avg_sq", lambda t: t.view(-1)[7].fill_(-1e-3)),
    "random basis_1": ("basis_1", lambda t: t.copy_(_random_basis(t))),
    "random basis_0": ("basis_0", lambda t: t.copy_(_random_basis(t))),
    "nan step": ("step", lambda t: t.fill_(float("nan"))),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_entry_is_rejected_naming_the_key(name):
    key, corrupt = CORRUPTIONS[name]
    params, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    corrupt(state["state"][1][key])
    with pytest.raises(ValueError, match=rf"{key} of parameter 1 \(") as caught:
        _load(params, state)
    # a row block that is not orthogonal may also be a sound state read through other row blocks
    assert "checkpoint is corrupt" in str(caught.value)
    assert ("row blocks differ" in str(caught.value)) == ("row block at" in str(caught.value))
    _load(params, copy.deepcopy(opt.state_dict()))  # the uncorrupted state still loads


def test_one_corrupt_row_block_of_basis_0_is_found():
    params = [torch.nn.Parameter(torch.randn(9, 4))]
    opt = SOAP(params, precondition_frequency=2, block_size=4, fused=False)
    for (g,) in gradient_stream([(9, 4)], 3):
        params[0].grad = g.float()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    basis = state["state"][0]["basis_0"]
    assert basis.shape == (9, 4)  # blocks of 4, 4 and 1 rows side by side
    basis[4:8, :4] = basis[4:8, :4] * 1.5  # scaled: still finite, no longer orthogonal
    other = SOAP([torch.nn.Parameter(params[0].detach().clone())], precondition_frequency=2, block_size=4)
    with pytest.raises(ValueError, match=r"basis_0 of parameter 0 .*row block at rows 4\.\.7"):
        other.load_state_dict(state)


def test_a_corrupt_single_row_block_is_called_corrupt():
    """One row block: other row blocks cannot be the cause (another block_size changes the width)."""
    params = [torch.nn.Parameter(torch.randn(6, 5))]
    opt = SOAP(params, precondition_frequency=2, fused=False)
    for (g,) in gradient_stream([(6, 5)], 3):
        params[0].grad = g.float()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["basis_0"][0, 0] += 0.5
    other = SOAP([torch.nn.Parameter(params[0].detach().clone())], precondition_frequency=2)
    with pytest.raises(ValueError, match=r"corrupt: basis_0 of parameter 0 .*\(rows 0\.\.5\)") as caught:
        other.load_state_dict(state)
    assert "row blocks differ" not in str(caught.value)


def test_pending_basis_is_checked_only_where_it_would_be_installed():
    params, opt = _trained(refresh_delay=1)
    saved = opt.state_dict()
    assert saved["state"][0]["pending_ok_1"].reshape(-1)[0] == 1.0  # saved between refresh and install

    def load(state):
        other = SOAP(
            [torch.nn.Parameter(p.detach().clone()) for p in params],
            precondition_frequency=2,
            refresh_delay=1,
            fused=False,
        )
        other.load_state_dict(state)

    state = copy.deepcopy(saved)
    state["state"][0]["pending_basis_1"].copy_(_random_basis(state["state"][0]["pending_basis_1"]))
    with pytest.raises(ValueError, match="corrupt: pending_basis_1 of parameter 0"):
        load(state)
    state["state"][0]["pending_ok_1"].zero_()  # a failed refresh: never installed, any values allowed
    state["state"][0]["pending_basis_1"].fill_(float("nan"))
    load(state)


def test_all_zero_basis_blocks_are_absent_not_corrupt():
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    basis = torch.zeros(6, 3, dtype=torch.float64)
    basis[3:6] = q  # a rank holding only the second block
    check_entry({"basis_0": basis, "basis_1": torch.zeros(4, 4)}, "parameter 0 (w)", [(0, 3), (3, 3)])
    basis[0, 0] = 0.5
    with pytest.raises(ValueError, match="basis_0"):
        check_entry({"basis_0": basis}, "parameter 0 (w)", [(0, 3), (3, 3)])


@pytest.mark.parametrize("d", [FULL_CHECK_DIM, FULL_CHECK_DIM + 44])  # the full product, then the probes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthogonality_error_separates_bases_from_corruption(d, dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].to(dtype)
    assert orthogonality_error(q).item() < 1e-4
    bent = q.clone()
    bent[:, 7] *= 1.1  # one column 10% too long
    assert orthogonality_error(bent).item() > 0.2
    bent[:, 7] = (q[:, 7] + q[:, 8]) / 2**0.5  # unit columns, but 7 and 8 at 45 degrees
    assert orthogonality_error(bent).item() > 0.1
    assert orthogonality_error(torch.randn(d, d, generator=gen, dtype=dtype)).item() > 1.0
    bent[3, 3] = float("nan")
    assert orthogonality_error(bent).isnan()
