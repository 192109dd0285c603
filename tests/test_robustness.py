"""Non-finite gradients, failing decompositions, bf16 parameters, closures, zero-gradient steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import gradient_stream

from soap_dist import SOAP, qr


def _all_bases_finite(opt: SOAP) -> bool:
    return all(torch.isfinite(store.bases).all() for store in opt._engine.stores.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_skipped_and_named(bad):
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    opt = SOAP(model.named_parameters(), lr=1e-2, precondition_frequency=2)
    x, y = torch.randn(64, 6), torch.randn(64, 1)

    def loss_fn():
        return torch.nn.functional.mse_loss(model(x), y)

    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    loss_fn().backward()
    model[0].weight.grad[0, 0] = bad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()  # step 3: the poisoned parameter's update is skipped; only weight decay applies
        decayed = before["0.weight"] * (1 - 1e-2 * 0.01)
        torch.testing.assert_close(model[0].weight.detach(), decayed, rtol=1e-6, atol=0)
        assert not torch.equal(model[2].weight.detach(), before["2.weight"])
        opt.zero_grad()
        loss_fn().backward()
        opt.step()  # step 4: a refresh, where the warning is issued
    messages = [str(w.message) for w in caught]
    assert any("non-finite" in m and "0.weight" in m for m in messages), messages
    assert _all_bases_finite(opt)
    start = loss_fn().item()
    for _ in range(20):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert loss_fn().item() < start


def test_a_skipped_gradient_is_reported_by_stats_before_the_next_refresh():
    """The steps leave the host read to the refresh (k = 50 here); stats() reads it at once."""
    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = SOAP([param], precondition_frequency=50)
    for step in range(3):
        param.grad = torch.randn(4, 3)
        if step == 2:
            param.grad[0, 0] = float("nan")
        opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert opt.stats()["nonfinite_params_warned"] == 1
    assert any("non-finite gradient for param_groups[0].params[0]" in str(w.message) for w in caught)
    assert any("(seen on the device at each step, read by stats())" in str(w.message) for w in caught)


def test_one_nan_loss_is_one_warning_naming_every_parameter_it_reached():
    """A NaN loss reaches every parameter's gradient: one warning names them all (it was one each)."""
    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(4)])
    opt = SOAP(model.named_parameters(), precondition_frequency=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            x = torch.randn(5, 3) * (float("nan") if step == 1 else 1.0)
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(messages) == 1, messages
    assert "non-finite gradient for 0.weight (shape (3, 3)), 0.bias (shape (3,)), 1.weight" in messages[0]
    assert "2.weight (shape (3, 3)) and 3 more (NaN/Inf" in messages[0]
    # the NaN came at step 2; the refresh that reads the flags runs at step 3
    assert "by step 3 (seen on the device at each step, reported at a basis refresh)" in messages[0]
    assert opt.stats()["nonfinite_params_warned"] == 8


def test_failing_eigh_keeps_the_old_basis_and_warns(monkeypatch):
    p = torch.nn.Parameter(torch.randn(5, 5))
    opt = SOAP([p], precondition_frequency=2)

    def broken(_):
        raise RuntimeError("linalg.eigh: the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    p.grad = torch.randn(5, 5)
    with pytest.warns(RuntimeWarning, match="eigendecomposition failed"):
        opt.step()
    monkeypatch.undo()
    for store in opt._engine.stores.values():  # the identity it started with
        assert torch.equal(store.bases, torch.eye(5).expand_as(store.bases))
    assert opt.stats()["refresh_failures"] == 2


def test_failing_qr_falls_back_then_keeps_the_old_basis(monkeypatch):
    p = torch.nn.Parameter(torch.randn(5, 5))
    opt = SOAP([p], precondition_frequency=1)
    for g in gradient_stream([(5, 5)], 2):
        p.grad = g[0].float()
        opt.step()
    bases = {k: s.bases.clone() for k, s in opt._engine.stores.items()}
    monkeypatch.setattr(
        qr, "cholesky_qr", lambda x: (x * float("nan"), torch.zeros(x.shape[0], dtype=bool), x)
    )
    monkeypatch.setattr(qr, "householder", lambda x: x * float("nan"))
    p.grad = torch.randn(5, 5)
    with pytest.warns(RuntimeWarning, match="refresh failed"):
        opt.step()
    for k, s in opt._engine.stores.items():
        assert torch.equal(s.bases, bases[k])
    assert torch.isfinite(p).all()


def test_cholesky_breakdown_uses_householder_result():
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    x[1, :, 5] = x[1, :, 4]  # exactly rank-deficient: Cholesky breaks down, Householder does not
    q, ok = qr.orthonormalize_(x.clone(), "cholesky_qr2")
    ref = qr.householder(x)
    assert ok.all()
    assert torch.allclose(q[0], ref[0], atol=1e-12) and torch.allclose(q[2], ref[2], atol=1e-12)
    assert torch.allclose(q[1].mT @ q[1], torch.eye(6, dtype=torch.float64), atol=1e-12)


def test_bf16_parameters_train():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1)).to(
        torch.bfloat16
    )
    opt = SOAP(model.parameters(), lr=3e-2, precondition_frequency=3)
    x = torch.randn(256, 8, dtype=torch.bfloat16)
    y = (x[:, :1] * 2).to(torch.bfloat16)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    state = opt.state_dict()["state"][0]
    assert state["exp_avg"].dtype == torch.float32 and state["factor_1"].dtype == torch.float32
    assert losses[-1] < 0.3 * losses[1], losses


def test_step_returns_closure_loss_and_zero_grad_lr0_step_is_finite():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([p], lr=0.0)
    p.grad = torch.zeros(4, 4)  # what DCP does to create state
    opt.step()
    p.grad = torch.zeros(4, 4)
    opt.step()
    assert torch.isfinite(p).all()
    state = opt.state_dict()["state"][0]
    assert all(torch.isfinite(t).all() for t in state.values())
    opt.param_groups[0]["lr"] = 1e-2

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))


def test_parameters_without_gradients_are_left_alone():
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([a, b], precondition_frequency=2)
    for _ in range(5):
        a.grad = torch.randn(4, 4)
        opt.step()
    b_before = b.detach().clone()
    b.grad = torch.randn(4, 4)
    a.grad = torch.randn(4, 4)
    opt.step()  # b's first call (no update) while a is mid-run
    assert torch.equal(b, b_before)
    steps = {k: v["step"].item() for k, v in opt.state_dict()["state"].items()}
    assert steps == {0: 5.0, 1: 0.0}


def test_a_compiled_step_runs_eagerly_and_matches():
    """torch.compile around opt.step() (torch's documented pattern) must train, as the eager step does:
    without the step's compiler.disable, the compiled call left the weights and the state untouched."""
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(5, 4, generator=gen)
    eager, compiled = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    eager_opt, compiled_opt = SOAP([eager], lr=1e-2), SOAP([compiled], lr=1e-2)
    compiled_step = torch.compile(compiled_opt.step, backend="eager")
    for _ in range(5):
        grad = torch.randn(5, 4, generator=gen)
        eager.grad, compiled.grad = grad.clone(), grad.clone()
        eager_opt.step()
        compiled_step()
    assert not torch.equal(compiled, start)
    assert torch.equal(compiled, eager)
    assert compiled_opt.state_dict()["state"][0]["step"] == 4


def test_an_integer_gradient_is_refused_by_name():
    w, n = torch.nn.Parameter(torch.randn(3, 3)), torch.zeros(3, dtype=torch.int64)
    opt = SOAP([w, n])
    w.grad, n.grad = torch.randn(3, 3), torch.ones(3, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"parameter 1 \(shape \(3,\), dtype torch.int64\).*floating-point"):
        opt.step()


def test_lr_scheduler_and_tensor_lr():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([p], lr=torch.tensor(1e-2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(4):
        p.grad = torch.randn(4, 4)
        opt.step()
        sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.5**4)
    assert torch.isfinite(p).all()


def test_qr_failure_in_float32_is_retried_in_float64(monkeypatch):
    householder = qr.householder

    def fails_in_float32(x):
        return x * float("nan") if x.dtype == torch.float32 else householder(x)

    monkeypatch.setattr(qr, "householder", fails_in_float32)
    x = torch.randn(2, 6, 6)
    q, ok = qr.orthonormalize_(x.clone(), "householder")
    assert ok.all()
    torch.testing.assert_close(q, householder(x.double()).float())


def test_parameters_swapped_before_the_first_step_are_used():
    """Accelerate/FSDP replace an optimizer's parameters after construction: state is built lazily."""
    original = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([original], precondition_frequency=2)
    replacement = torch.nn.Parameter(torch.randn(6, 6))
    opt.param_groups[0]["params"] = [replacement]
    before = replacement.detach().clone()
    for _ in range(3):
        replacement.grad = torch.randn(6, 6)
        opt.step()
    assert not torch.equal(replacement, before)
    assert opt.state_dict()["state"][0]["exp_avg"].shape == (6, 6)


def test_an_all_zero_first_gradient_does_not_start_the_preconditioner():
    """DeepSpeed's fp16/bf16 stage-0 wrappers (and DCP) call step once with zero gradients to create
    state; the run must then equal one that never saw that call."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(6, 4, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn(w.shape, generator=gen) for w in init] for _ in range(7)]

    def run(zero_first: bool):
        ps = [torch.nn.Parameter(w.clone()) for w in init]
        opt = SOAP(ps, lr=0.01, precondition_frequency=3, fused=False)
        if zero_first:
            for p in ps:
                p.grad = torch.zeros_like(p)
            opt.step()
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in ps]

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)


def test_the_index_cache_is_bounded_and_stays_correct(monkeypatch):
    """engine._index caches device index tensors; a model whose set of stepped parameters changes
    meets new keys every step, so the cache is emptied when full instead of growing."""
    from soap_dist.engine import core

    monkeypatch.setattr(core, "INDEX_CACHE_SIZE", 3)
    params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    opt = SOAP(params, precondition_frequency=2, fused=False)
    for p in params:
        p.grad = torch.randn(4, 4)
    opt.step()
    engine = opt._engine
    for n in range(1, 12):
        keys = list(range(n))
        assert engine._index(keys).tolist() == keys
        assert len(engine._indices) <= 3


def test_a_non_finite_first_gradient_does_not_start_the_preconditioner():
    """A NaN first gradient is zeroed for its step; starting there built the first bases from a zero
    factor (3.5e-2 away after 25 steps). Now the run equals one that never saw that call."""
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(6, 4, generator=gen)
    grads = [torch.randn(6, 4, generator=gen) for _ in range(9)]

    def run(nan_first: bool):
        p = torch.nn.Parameter(init.clone())
        opt = SOAP([p], lr=0.01, precondition_frequency=3, fused=False)
        if nan_first:
            p.grad = torch.full_like(p, float("nan"))
            with pytest.warns(RuntimeWarning, match="non-finite gradient"):
                opt.step()
                for g in grads[:3]:  # the warning comes at the next refresh
                    p.grad = g.clone()
                    opt.step()
            rest = grads[3:]
        else:
            rest = grads
        for g in rest:
            p.grad = g.clone()
            opt.step()
        return p.detach()

    assert torch.equal(run(True), run(False))


def test_a_float16_gradient_whose_norm_passes_65504_is_not_skipped():
    """The finiteness check took the norm in the gradient's dtype: a float16 gradient of 256 x 256
    entries near 300 (norm 76,800) overflowed it and was skipped as non-finite, every step."""
    import warnings

    moved = {}
    for dtype in (torch.float16, torch.float32):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.zeros(256, 256, dtype=dtype))
        opt = SOAP([p], lr=1e-3, precondition_frequency=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no "non-finite gradient" warning
            for _ in range(4):
                p.grad = (300 * torch.randn(256, 256)).to(dtype)
                opt.step()
        moved[dtype] = p.detach().float().abs().max().item()
    assert moved[torch.float16] > 0.5 * moved[torch.float32] > 0, moved


def test_a_float64_gradient_too_large_for_float32_factors_is_skipped_and_leaves_them_finite():
    """float64 weights, float32 factors (the default): a finite gradient of 1e20 passed the check,
    G G^T overflowed the factor to Inf, then NaN, and no refresh ever succeeded again."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    opt = SOAP([p], lr=0.01, precondition_frequency=5)
    with pytest.warns(RuntimeWarning, match="overflows factor_dtype=torch.float32"):
        for t in range(40):
            p.grad = torch.randn(8, 8, dtype=torch.float64) * (1e20 if 3 <= t <= 5 else 1.0)
            opt.step()
    state = opt.state_dict()["state"][0]
    assert all(bool(state[k].isfinite().all()) for k in ("factor_0", "factor_1", "basis_0", "basis_1"))
    assert opt.stats()["refresh_failures"] == 0 and bool(p.isfinite().all())


def test_normalize_grads_after_a_long_run_of_zero_gradients_takes_no_giant_step():
    """Adam's direction shrinks towards 1e-23 over ~1300 zero gradients; its float32 squares underflowed
    to 0, the RMS became the 1e-30 guard, and the normalized step was 7e4 instead of ~lr."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = SOAP([p], lr=1e-3, precondition_frequency=5, normalize_grads=True)
    for t in range(1400):
        p.grad = torch.randn(8, 8) if t < 10 else torch.zeros(8, 8)
        before = p.detach().clone()
        opt.step()
        assert (p.detach() - before).abs().max() < 0.05, t  # ~lr per element, at most a few times it


def test_rank_one_gradients_step_outside_their_span_with_float32_factors_only():
    """docs/algorithm.md, 'Low-rank gradients and float32 factors': float32 factors' rounding in the
    directions a rank-1 gradient never spans, above eps, becomes full-size steps there (as in the
    reference); float64 factors stay at rounding level. Measures the figures the page quotes."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    u = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 8, generator=gen, dtype=torch.float64)
    u, v = u / u.norm(), v / v.norm()
    grads = [u @ v * torch.randn((), generator=gen, dtype=torch.float64) for _ in range(40)]

    def outside(factor_dtype: torch.dtype) -> float:
        p = torch.nn.Parameter(w0.clone())
        opt = SOAP([p], lr=1e-2, weight_decay=0.0, precondition_frequency=5, factor_dtype=factor_dtype)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        d = p.detach() - w0
        return float((d - u @ (u.T @ d @ v.T) @ v).norm())

    assert outside(torch.float64) < 1e-8 and outside(torch.float32) > 1e-2, (
        outside(torch.float64),
        outside(torch.float32),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_step_inside_autocast_computes_as_one_outside(dtype):
    """Autocast would run SOAP's rotations and refresh products in bf16/fp16; the step turns it off
    (a closure still runs in the caller's autocast)."""
    grads = gradient_stream([(6, 5), (5,)], 6)
    runs = []
    for inside in (False, True):
        params = [torch.nn.Parameter(torch.ones(6, 5)), torch.nn.Parameter(torch.ones(5))]
        opt = SOAP(params, lr=1e-2, precondition_frequency=2)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.float() * 1e-7  # the size of unscaled fp16 gradients
            with torch.autocast("cpu", dtype=dtype, enabled=inside):
                seen = []
                opt.step(lambda seen=seen: seen.append(torch.is_autocast_enabled("cpu")) or 0.0)
            assert seen == [inside]
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_a_parameter_on_a_device_autocast_does_not_know_gets_the_device_message():
    params = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.empty(3, 3, device="meta"))]
    params[0].grad = torch.randn(3, 3)
    with pytest.raises(ValueError, match="all parameters on one device"):
        SOAP(params).step()


@pytest.mark.parametrize("refresh_delay", [0, 1])
def test_no_gradient_is_kept_alive_after_the_step(refresh_delay):
    """zero_grad() frees the gradients as under AdamW: a reference the engine kept past the step held
    every gradient through the next backward (twice the gradients' memory)."""
    import gc
    import weakref

    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))]
    opt = SOAP(params, precondition_frequency=2, refresh_delay=refresh_delay)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        alive = [weakref.ref(p.grad) for p in params]
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert [r() is None for r in alive] == [True, True]


def test_stats_docstring_names_every_key():
    """The keys a user reads were undocumented (the docstring named installed_at only)."""
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = SOAP(params, precondition_frequency=2)
    assert opt.stats() == {"built": False}
    for _ in range(3):
        params[0].grad = torch.randn(4, 3)
        opt.step()
    missing = [key for key in opt.stats() if f"``{key}``" not in SOAP.stats.__doc__]
    assert missing == [], missing
