"""The refresh's matrix functions against float64 references."""

from __future__ import annotations

import pytest
import torch

from soap_dist import linalg, qr


def _factor_and_nearby_basis(n: int, d: int, cond: float, dtype, seed: int = 0):
    """A factor with eigenvalues spread over ``cond`` and a basis that is a perturbed eigenbasis."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, d, dtype=torch.float64, generator=gen))
    lam = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
    factor = q @ torch.diag_embed(lam.expand(n, d)) @ q.mT
    noise = 1e-3 * torch.randn(n, d, d, dtype=torch.float64, generator=gen)
    near, _ = torch.linalg.qr(q + noise)
    return factor.to(dtype), near.to(dtype)


@pytest.mark.parametrize("dtype, cond, tol", [(torch.float64, 1e10, 1e-8), (torch.float32, 1e4, 1e-3)])
def test_cholesky_qr2_refresh_matches_householder(dtype, cond, tol):
    factor, basis = _factor_and_nearby_basis(4, 48, cond, dtype)
    fast, perm_f, ok_f = linalg.power_iteration_refresh(factor, basis, "cholesky_qr2")
    ref, perm_r, ok_r = linalg.power_iteration_refresh(factor, basis, "householder")
    assert ok_f.all() and ok_r.all() and torch.equal(perm_f, perm_r)
    assert (fast - ref).abs().max().item() < tol
    eye = torch.eye(48, dtype=dtype)
    assert (fast.mT @ fast - eye).abs().max().item() < (1e-12 if dtype == torch.float64 else 1e-5)


def test_refresh_sorts_by_estimated_eigenvalue():
    factor, basis = _factor_and_nearby_basis(2, 16, 1e3, torch.float64)
    shuffled = basis[:, :, torch.randperm(16)]
    new, perm, ok = linalg.power_iteration_refresh(factor, shuffled)
    est = torch.einsum("nij,nik,nkj->nj", new, factor, new)
    assert ok.all() and (est[:, :-1] >= est[:, 1:] - 1e-9).all()


def test_eigh_descending_orders_columns():
    a = torch.randn(3, 10, 10, dtype=torch.float64)
    f = a @ a.mT
    q, ok = linalg.eigh_descending(f)
    lam = torch.einsum("nij,nik,nkj->nj", q, f, q)
    assert ok.all() and (lam[:, :-1] >= lam[:, 1:]).all()


def test_eigh_nonfinite_input_is_flagged_not_raised():
    f = torch.eye(4).expand(2, 4, 4).clone()
    f[1, 0, 0] = float("nan")
    q, ok = linalg.eigh_descending(f)
    assert ok.tolist() == [True, False] and torch.isfinite(q).all()


def test_split_tf32_is_exact():
    x = torch.randn(5, 7)
    hi, lo = qr.split_tf32(x)
    assert torch.equal(hi + lo, x)
    assert ((hi.view(torch.int32) & 8191) == 0).all()


@pytest.mark.parametrize("method", ["cholesky_qr2", "householder"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_refresh_flags_a_nonfinite_factor(method, bad):
    """One bad entry anywhere in a factor (here off the diagonal, last row) marks only that factor."""
    factor, basis = _factor_and_nearby_basis(3, 12, 1e3, torch.float32)
    factor[1, -1, 3] = bad
    new, _, ok = linalg.power_iteration_refresh(factor, basis, method)
    assert ok.tolist() == [True, False, True]
    assert torch.isfinite(new[0]).all() and torch.isfinite(new[2]).all()


def test_householder_gives_positive_r_diagonal():
    x = torch.randn(4, 9, 9, dtype=torch.float64)
    q = qr.householder(x.clone())
    r = q.mT @ x
    assert torch.allclose(torch.tril(r, -1), torch.zeros_like(r), atol=1e-12)
    assert (torch.diagonal(r, dim1=-2, dim2=-1) > 0).all()
    assert torch.allclose(q.mT @ q, torch.eye(9, dtype=torch.float64).expand(4, 9, 9), atol=1e-12)
