"""A Householder QR that raises inside the refresh: caught per matrix, old bases kept, counted, warned."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import gradient_stream

from soap_dist import SOAP, qr

MARK = 1234.5  # an entry no generated matrix holds: the fake geqrf raises on a batch containing it


def _raising_on_marked(real):
    def geqrf(x):
        if (x == MARK).any():
            raise RuntimeError("geqrf: the algorithm failed (simulated LAPACK error)")
        return real(x)

    return geqrf


@pytest.mark.parametrize("method", ["householder", "cholesky_qr2"])
def test_a_raising_qr_flags_only_its_matrix(monkeypatch, method):
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    if method == "cholesky_qr2":  # every matrix goes to the Householder fallback
        monkeypatch.setattr(qr, "cholesky_qr", lambda y: (y, torch.zeros(y.shape[0], dtype=torch.bool), y))
    ref = qr.householder(x.clone())
    x[1, 2, 3] = MARK
    monkeypatch.setattr(torch, "geqrf", _raising_on_marked(torch.geqrf))
    q, ok = qr.orthonormalize_(x.clone(), method)
    assert ok.tolist() == [True, False, True]
    assert torch.equal(q[0], ref[0]) and torch.equal(q[2], ref[2])
    assert torch.isfinite(q).all()


def test_refresh_with_a_raising_qr_keeps_the_old_bases(monkeypatch):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = SOAP([p], lr=1e-2, precondition_frequency=1, qr_method="householder", fused=False)
    grads = gradient_stream([(5, 4)], 12)
    for g in grads[:2]:
        p.grad = g[0].float()
        opt.step()
    bases = {k: s.bases.clone() for k, s in opt._engine.stores.items()}
    failures, installed = opt.stats()["refresh_failures"], opt.stats()["bases_installed"]

    def broken(*_):
        raise RuntimeError("householder_product: simulated cuSOLVER error")

    monkeypatch.setattr(torch.linalg, "householder_product", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for g in grads[2:5]:  # three refreshes, each failing for both factors
            p.grad = g[0].float()
            opt.step()
    messages = [str(w.message) for w in caught if "refresh failed" in str(w.message)]
    assert len(messages) == 1, messages
    for k, s in opt._engine.stores.items():
        assert torch.equal(s.bases, bases[k])
    assert opt.stats()["refresh_failures"] == failures + 3 * 2
    assert opt.stats()["bases_installed"] == installed  # a kept basis is not counted as installed
    assert torch.isfinite(p).all()

    monkeypatch.undo()
    for g in grads[5:]:
        p.grad = g[0].float()
        opt.step()
    assert torch.isfinite(p).all()
    assert all(not torch.equal(s.bases, bases[k]) for k, s in opt._engine.stores.items())
    assert opt.stats()["refresh_failures"] == failures + 3 * 2
    assert opt.stats()["bases_installed"] == installed + (len(grads) - 5) * 2
