"""async_refresh: the refresh beside the next step (a CUDA side stream; inline on a CPU, same code).

The asynchronous path must give the synchronous path's results bit for bit wherever no
decomposition fails, report a failure at the install step instead of at once, and keep the failed
factor's old basis (it cannot wait on the host for a Householder redo).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import gradient_stream

from soap_dist import SOAP, qr

SHAPES = [(12, 7), (9, 9), (5,), (20, 3)]


def _train(steps: int = 16, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64, generator=gen)) for s in SHAPES]
    opt = SOAP(params, lr=0.02, precondition_frequency=3, fused=False, factor_dtype=torch.float64, **kw)
    for grads in gradient_stream(SHAPES, steps):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("qr_method", ["householder", "cholesky_qr2"])
@pytest.mark.parametrize("delay", [1, 2])
def test_async_equals_sync_bitwise(qr_method, delay, monkeypatch):
    """(20, 3)'s 20-row factor is rank-deficient early on: CholeskyQR2 breaks down and is redone."""
    redone = []
    real = qr.safe_householder
    monkeypatch.setattr(qr, "safe_householder", lambda x: redone.append(x.shape[0]) or real(x))
    sync, sync_opt = _train(refresh_delay=delay, qr_method=qr_method, async_refresh=False)
    in_sync, redone[:] = len(redone), []
    asyn, async_opt = _train(refresh_delay=delay, qr_method=qr_method, async_refresh=True)
    assert len(redone) == in_sync > 0
    assert async_opt._engine.side is not None and sync_opt._engine.side is None
    for a, b in zip(sync, asyn, strict=True):
        assert torch.equal(a, b)
    assert sync_opt.stats()["bases_installed"] == async_opt.stats()["bases_installed"] > 0


def test_default_is_async_only_on_cuda_with_a_delay():
    _, cpu = _train(steps=2, refresh_delay=1)
    assert cpu._engine.side is None  # CPU: no side stream by default


@pytest.mark.parametrize("value", ["yes", 1, 0])
def test_bad_async_refresh_is_refused(value):
    with pytest.raises(ValueError, match="invalid async_refresh=.*expected None, True or False"):
        SOAP([torch.nn.Parameter(torch.zeros(3, 3))], refresh_delay=1, async_refresh=value)


def test_async_without_a_delay_says_what_to_set():
    with pytest.raises(ValueError, match=r"async_refresh=True.*refresh_delay=1"):
        SOAP([torch.nn.Parameter(torch.zeros(3, 3))], async_refresh=True)


def _broken_cholesky(monkeypatch):
    real = qr.cholesky_qr
    monkeypatch.setattr(qr, "cholesky_qr", lambda x: (real(x)[0], torch.zeros(x.shape[0], dtype=bool), x))


def test_a_breakdown_is_redone_at_the_next_step_as_the_synchronous_refresh_does(monkeypatch):
    """Every CholeskyQR2 breaks down: the side stream cannot ask the host, so the power iterates wait
    in the stash and the next step redoes them with Householder: the synchronous result, bitwise."""
    _broken_cholesky(monkeypatch)
    redone = []
    real = qr.safe_householder
    monkeypatch.setattr(qr, "safe_householder", lambda x: redone.append(x.shape[0]) or real(x))
    kw = dict(refresh_delay=1, qr_method="cholesky_qr2")
    sync, sync_opt = _train(steps=8, async_refresh=False, **kw)
    in_sync = sum(redone)
    asyn, async_opt = _train(steps=8, async_refresh=True, **kw)
    assert in_sync > 0 and sum(redone) == 2 * in_sync
    for a, b in zip(sync, asyn, strict=True):
        assert torch.equal(a, b)
    assert async_opt.stats()["refresh_failures"] == sync_opt.stats()["refresh_failures"] == 0


def test_a_failed_refresh_is_reported_a_step_later_and_keeps_the_old_basis(monkeypatch):
    """CholeskyQR2 and Householder both fail: reported when the launch is finished (the next step),
    not at the launch, and the old bases stay, as in the synchronous refresh."""
    _broken_cholesky(monkeypatch)
    monkeypatch.setattr(qr, "householder", lambda x: x * float("nan"))
    params, opt = _train(steps=4, refresh_delay=1, async_refresh=True, qr_method="cholesky_qr2")
    engine = opt._engine
    before = [s.bases.clone() for s in engine.stores.values()]
    assert engine.counters.refreshes == 1 and opt.stats()["refresh_failures"] == 0  # launched, not read
    grads = gradient_stream(SHAPES, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (4, 5):  # the finish, then the install
            for p, g in zip(params, grads[step], strict=True):
                p.grad = g
            opt.step()
            if step == 4:
                assert opt.stats()["refresh_failures"] == sum(len(s.slots) for s in engine.stores.values())
    assert any("refresh failed" in str(w.message) for w in caught)
    for old, store in zip(before, engine.stores.values(), strict=True):
        assert torch.equal(old, store.bases)


def test_side_stream_seconds_are_reported_and_zero_without_a_stream():
    _, opt = _train(steps=8, refresh_delay=1, async_refresh=True)  # inline on a CPU: no side stream
    stats = opt.stats()
    assert stats["refreshes"] >= 2 and stats["refresh_side_stream_seconds"] == 0.0


def test_checkpoint_waits_for_the_async_refresh():
    params, opt = _train(steps=4, refresh_delay=1, async_refresh=True)  # a refresh in flight
    state = opt.state_dict()
    _, other = _train(steps=4, refresh_delay=1, async_refresh=False)
    reference = other.state_dict()
    for i, entry in reference["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                assert torch.equal(value, state["state"][i][key]), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_side_stream_refresh_equals_the_synchronous_one():
    """On CUDA the default with refresh_delay=1 is the side stream, and it computes what the
    synchronous refresh computes. float64, where CholeskyQR2's products are plain GEMMs: cuBLAS does
    not promise bitwise equal results on two streams, so the check is to 1e-10."""
    shapes = [(256, 512), (512, 256), (512,)]
    results = []
    for async_refresh in (None, False):
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.float64, generator=gen))
            for s in shapes
        ]
        opt = SOAP(
            params,
            lr=1e-3,
            precondition_frequency=3,
            refresh_delay=1,
            async_refresh=async_refresh,
            factor_dtype=torch.float64,
            qr_method="cholesky_qr2",
            fused=False,
        )
        for _ in range(12):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", dtype=torch.float64, generator=gen)
            opt.step()
        torch.cuda.synchronize()
        results.append(([p.detach().clone() for p in params], opt._engine.side, opt.stats()))
    (async_params, side, stats), (sync_params, none, _) = results
    assert side is not None and side.stream is not None and none is None
    assert stats["refreshes"] == 3 and stats["bases_installed"] > 0
    for a, b in zip(async_params, sync_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_load_over_a_launched_refresh_is_the_loaded_state():
    """load_state_dict while a refresh is launched and a broadcast in flight: the loaded state wins."""
    params, opt = _train(steps=4, refresh_delay=1, async_refresh=True)
    saved_params = [p.detach().clone() for p in params]
    saved = opt.state_dict()
    grads = gradient_stream(SHAPES, 10)
    for step in range(4, 7):  # a second refresh is launched at the 7th call
        for p, g in zip(params, grads[step], strict=True):
            p.grad = g
        opt.step()
    assert opt._engine._launched
    # On CUDA the replaced engine's memory goes back to the step's stream when the load drops it: that
    # stream must first wait for the refresh still running on the side stream (no stream on a CPU)
    replaced, joined = opt._engine, []
    replaced.side.join = lambda: joined.append(True)
    fresh = [torch.nn.Parameter(w.clone()) for w in saved_params]
    other = SOAP(
        fresh,
        lr=0.02,
        precondition_frequency=3,
        fused=False,
        factor_dtype=torch.float64,
        refresh_delay=1,
        async_refresh=True,
    )
    for tensors, optimizer in ((params, opt), (fresh, other)):
        with torch.no_grad():
            for p, w in zip(tensors, saved_params, strict=True):
                p.copy_(w)
        optimizer.load_state_dict(saved)
        for step in range(4, 9):
            for p, g in zip(tensors, grads[step], strict=True):
                p.grad = g
            optimizer.step()
    assert joined and opt._engine is not replaced
    for a, b in zip(params, fresh, strict=True):
        assert torch.equal(a, b)
