"""state_dict round trips continue bitwise identically, between refreshes and across one."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import gradient_stream

from soap_dist import SOAP

SHAPES = [(6, 5), (5,), (4, 3, 2), (9, 4)]


def _make(init, **kw):
    params = [torch.nn.Parameter(w.clone()) for w in init]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 1e-2, "precondition_1d": True}]
    return params, SOAP(groups, precondition_frequency=3, **kw)


def _drive(params, opt, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.float()
        opt.step()


@pytest.mark.parametrize("split", [4, 6, 7])  # 6: saved right after a refresh; 4, 7: between refreshes
@pytest.mark.parametrize("options", [{}, {"refresh_delay": 1}, {"block_size": 4}])
def test_round_trip_continues_bitwise(split, options):
    init = [torch.randn(s) for s in SHAPES]
    grads = gradient_stream(SHAPES, 14)
    params_a, opt_a = _make(init, **options)
    _drive(params_a, opt_a, grads)

    params_b, opt_b = _make(init, **options)
    _drive(params_b, opt_b, grads[:split])
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params_b], "opt": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    params_c, opt_c = _make([w for w in saved["model"]], **options)
    opt_c.load_state_dict(saved["opt"])
    _drive(params_c, opt_c, grads[split:])
    for a, c in zip(params_a, params_c, strict=True):
        assert torch.equal(a, c)


def test_state_dict_has_every_key_after_the_first_step():
    init = [torch.randn(s) for s in SHAPES]
    params, opt = _make(init, refresh_delay=1)
    _drive(params, opt, gradient_stream(SHAPES, 1))
    first = {k: set(v) for k, v in opt.state_dict()["state"].items()}
    _drive(params, opt, gradient_stream(SHAPES, 5, seed=3))
    later = {k: set(v) for k, v in opt.state_dict()["state"].items()}
    assert first == later
    assert {"exp_avg", "exp_avg_sq", "factor_0", "basis_0", "factor_1", "pending_basis_1"} <= first[0]


def test_load_rejects_a_mismatched_state():
    init = [torch.randn(s) for s in SHAPES]
    params, opt = _make(init)
    _drive(params, opt, gradient_stream(SHAPES, 2))
    state = copy.deepcopy(opt.state_dict())
    other = SOAP([torch.nn.Parameter(torch.randn(3, 3))])
    with pytest.raises(ValueError, match="param groups"):
        other.load_state_dict(state)
    state["param_groups"][0]["block_size"] = 2
    _, fresh = _make(init)
    with pytest.raises(ValueError, match="block_size"):
        fresh.load_state_dict(state)


def test_fresh_optimizer_state_dict_loads():
    init = [torch.randn(s) for s in SHAPES]
    _, opt = _make(init)
    _, other = _make(init)
    other.load_state_dict(opt.state_dict())
    assert other.state_dict()["state"] == {}


def test_add_param_group_mid_run_keeps_the_existing_state():
    init = [torch.randn(s) for s in SHAPES]
    extra_init = torch.randn(5, 5)
    grads = gradient_stream(SHAPES, 12)
    extra_grads = gradient_stream([(5, 5)], 6, seed=7)
    params_a, opt_a = _make(init)
    _drive(params_a, opt_a, grads)

    params_b, opt_b = _make(init)
    _drive(params_b, opt_b, grads[:6])
    extra = torch.nn.Parameter(extra_init.clone())
    opt_b.add_param_group({"params": [extra], "lr": 1e-2})
    for step_grads, (g,) in zip(grads[6:], extra_grads, strict=True):
        extra.grad = g.float()
        _drive(params_b, opt_b, [step_grads])
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(extra, extra_init)
    assert opt_b.state_dict()["state"][len(SHAPES)]["step"].item() == 5.0


def test_a_carried_state_that_fails_to_load_is_kept_for_the_retry(monkeypatch):
    """A rebuild whose state load raises must not leave a fresh engine behind: the retried step would
    silently start every parameter afresh."""
    import soap_dist.optimizer as optimizer_module

    params, opt = _make([torch.randn(s) for s in SHAPES])
    _drive(params, opt, gradient_stream(SHAPES, 4))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 3))]})

    def refuse(*_, **__):
        raise ValueError("simulated: the state does not fit")

    monkeypatch.setattr(optimizer_module, "load_engine_state", refuse)
    with pytest.raises(ValueError, match="simulated"):
        opt.step()
    with pytest.raises(ValueError, match="simulated"):  # again, not a quiet fresh start
        opt.step()
    monkeypatch.undo()
    _drive(params, opt, gradient_stream(SHAPES, 1, seed=9))
    assert opt.state_dict()["state"][0]["step"].item() == 4.0  # the first step only initializes: 3 + 1


def test_pending_basis_is_not_dropped_by_a_load_without_refresh_delay():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    opt = SOAP([w], precondition_frequency=2, refresh_delay=1, fused=False)
    for _ in range(4):  # a refresh at step 2, installed at step 4; saved at step 3
        w.grad = torch.randn(6, 5)
        opt.step()
    saved = opt.state_dict()
    other = SOAP([torch.nn.Parameter(w.detach().clone())], precondition_frequency=2, fused=False)
    with pytest.raises(ValueError, match="refresh_delay"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("kind", ["corrupt", "other shapes", "adamw"])
def test_a_refused_load_leaves_the_optimizer_as_it_was(kind):
    """Before, the refused load had already taken the checkpoint's lr and thrown the state away: a
    caller that caught the error trained on from nothing."""
    init = [torch.randn(s) for s in SHAPES]
    grads = gradient_stream(SHAPES, 6)
    params_a, opt_a = _make(init)
    params_b, opt_b = _make(init)
    _drive(params_a, opt_a, grads[:3])
    _drive(params_b, opt_b, grads[:3])
    bad = copy.deepcopy(opt_b.state_dict())
    if kind == "corrupt":
        bad["state"][2]["exp_avg"][0, 0, 0] = float("nan")  # after parameters 0 and 1 would be copied
    elif kind == "other shapes":
        bad["state"][3] = copy.deepcopy(bad["state"][0])
    else:
        adamw = torch.optim.AdamW([torch.nn.Parameter(w.clone()) for w in init])
        for p, g in zip(adamw.param_groups[0]["params"], grads[0], strict=True):
            p.grad = g.float()
        adamw.step()
        bad["state"] = adamw.state_dict()["state"]
    for group in bad["param_groups"]:
        group["lr"] = 0.5
    message = {
        "corrupt": "is corrupt",
        "other shapes": "saved for another model",
        "adamw": "not a SOAP state",
    }
    with pytest.raises(ValueError, match=message[kind]):
        opt_b.load_state_dict(bad)
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]
    _drive(params_a, opt_a, grads[3:])
    _drive(params_b, opt_b, grads[3:])
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)


def test_frozen_parameters_round_trip_through_dcp():
    """DCP's set_optimizer_state_dict leaves out frozen parameters' entries; SOAP starts them afresh
    (they never stepped), as torch.optim does. Before, it refused the state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        model[0].bias.requires_grad_(False)
        return model, SOAP(model.parameters(), precondition_frequency=3)

    x, y = torch.randn(16, 6), torch.randn(16, 4)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model, opt = build()
    train(model, opt, 4)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    weights = copy.deepcopy(model.state_dict())
    train(model, opt, 4)
    again, opt2 = build()
    again.load_state_dict(weights)
    set_optimizer_state_dict(again, opt2, saved)
    train(again, opt2, 4)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_trainable_parameter_missing_from_the_state_starts_afresh_with_a_warning():
    init = [torch.randn(s) for s in SHAPES]
    params, opt = _make(init)
    _drive(params, opt, gradient_stream(SHAPES, 3))
    state = copy.deepcopy(opt.state_dict())
    del state["state"][1]
    _, fresh = _make(init)
    with pytest.warns(
        UserWarning, match=r"no entry for 1 trainable parameters \(param_groups\[0\]\.params\[1\]\)"
    ):
        fresh.load_state_dict(state)
    assert [int(e["step"]) for e in fresh.state_dict()["state"].values()] == [2, 0, 2, 2]


def test_a_load_into_an_unstarted_engine_frees_it_before_building_the_new_one(monkeypatch):
    """DCP's set_optimizer_state_dict steps once with zero gradients (an engine, nothing started)
    before loading: keeping that engine for a refusal would double the optimizer's memory."""
    import gc
    import weakref

    init = [torch.randn(s) for s in SHAPES]
    params, opt = _make(init)
    _drive(params, opt, gradient_stream(SHAPES, 3))
    saved = copy.deepcopy(opt.state_dict())
    fresh_params, fresh = _make(init)
    for p in fresh_params:
        p.grad = torch.zeros_like(p)
    fresh.step()  # DCP's initialising step: nothing starts on zero gradients
    old = weakref.ref(fresh._engine)
    build = SOAP._ensure_engine
    alive = []

    def ensure(self):
        gc.collect()
        alive.append(old() is not None)
        return build(self)

    monkeypatch.setattr(SOAP, "_ensure_engine", ensure)
    fresh.load_state_dict(saved)
    assert alive == [False]


def test_a_load_replaces_a_copys_carried_state():
    """After deepcopy (or pickling) the state waits to be loaded into the next engine; a load that
    lacks a parameter's entry must start it afresh, not from the carried copy."""
    init = [torch.randn(s) for s in SHAPES]
    params, opt = _make(init)
    _drive(params, opt, gradient_stream(SHAPES, 4))
    state = copy.deepcopy(opt.state_dict())
    del state["state"][1]
    twin = copy.deepcopy(opt)
    with pytest.warns(UserWarning, match="start afresh"):
        twin.load_state_dict(state)
    assert [int(e["step"]) for e in twin.state_dict()["state"].values()] == [3, 0, 3, 3]


def test_any_error_inside_the_copy_is_a_refusal_with_the_optimizer_unchanged():
    """A row factor narrower than its blocks fails inside the copy (a RuntimeError, on the owner rank
    alone under placement owner, where the other ranks would wait in the agreement's collective):
    it is a ValueError, agreed between the ranks, and the optimizer is as it was."""
    init = [torch.randn(s) for s in SHAPES]
    params, opt = _make(init)
    _drive(params, opt, gradient_stream(SHAPES, 3))
    state = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    for key in ("factor_0", "basis_0"):
        state["state"][0][key] = state["state"][0][key][:, :3].clone()
    with pytest.raises(
        ValueError, match=r"factor_0 of .* holds a block of shape \(6, 3\) where this optimizer's"
    ):
        opt.load_state_dict(state)  # found before the copy (ZeRO copies in place)
    after = opt.state_dict()
    assert all(torch.equal(v, after["state"][i][k]) for i, e in before["state"].items() for k, v in e.items())
    import soap_dist.optimizer_state as optimizer_state

    def failing(*args, **kwargs):
        raise RuntimeError("a failure no check foresaw")

    mp = pytest.MonkeyPatch()
    mp.setattr(optimizer_state, "load_engine_state", failing)
    try:
        with pytest.raises(
            ValueError, match=r"does not fit this optimizer \(RuntimeError\('a failure no check"
        ):
            opt.load_state_dict(copy.deepcopy(before))
    finally:
        mp.undo()
    after = opt.state_dict()
    assert all(torch.equal(v, after["state"][i][k]) for i, e in before["state"].items() for k, v in e.items())


def test_step_counts_past_float32s_integers_survive_a_round_trip():
    """Counts were saved as float32, exact only to 2**24: step 16,777,217 came back as 16,777,216 and
    a pending install one step late. They are float64 now (exact to 2**53)."""
    w = torch.nn.Parameter(torch.randn(5, 4))
    opt = SOAP([w], precondition_frequency=2, refresh_delay=1, refresh_schedule="staggered")
    for _ in range(2):
        w.grad = torch.randn(5, 4)
        opt.step()
    engine = opt._engine
    engine.steps = [2**24 + 1 for _ in engine.steps]  # odd: not a float32
    engine.install_step = {i: 2**24 + 3 for i in range(len(engine.steps))}
    saved = opt.state_dict()
    again = SOAP([torch.nn.Parameter(w.detach().clone())], precondition_frequency=2, refresh_delay=1,
                 refresh_schedule="staggered")  # fmt: skip
    again.load_state_dict(copy.deepcopy(saved))
    assert again._engine.steps == engine.steps
    assert again._engine.install_step == engine.install_step


def test_a_state_with_other_row_blocks_is_named_as_such():
    """fsdp-local with block_size=None saves one row block per shard (4 of a matrix's 8 rows at world
    2) while recording block_size=None; one process with block_size=None holds one 8-row block. The
    refusal names the row blocks (before, "saved for another model or other options")."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = SOAP([w], precondition_frequency=2, block_size=4)
    for _ in range(3):
        w.grad = torch.randn(8, 6)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["block_size"] = None  # as fsdp-local at world 2 records it
    other = SOAP([torch.nn.Parameter(w.detach().clone())], precondition_frequency=2, block_size=None)
    with pytest.raises(ValueError, match=r"row blocks differ .*whose row blocks are the shards"):
        other.load_state_dict(saved)


def test_state_dict_after_add_param_group_and_before_a_step_keeps_the_state():
    """add_param_group drops the engine and carries its state to the next one, built at the next step;
    a state_dict() in between returned no state at all (and DCP, seeing the markers, saved none)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 4))
    opt = SOAP([w], precondition_frequency=2)
    for _ in range(3):
        w.grad = torch.randn(5, 4)
        opt.step()
    before = copy.deepcopy(opt.state_dict()["state"][0])
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 3))]})
    after = opt.state_dict()["state"]
    assert set(after) == {0, 1}, sorted(after)
    assert all(torch.equal(v, after[0][k]) for k, v in before.items())


def test_a_copy_taken_between_add_param_group_and_the_next_step_keeps_the_state():
    params, opt = _make([torch.randn(s) for s in SHAPES])
    _drive(params, opt, gradient_stream(SHAPES, 4))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 3))]})
    copied = copy.deepcopy(opt)
    steps = [o.state_dict()["state"][0]["step"].item() for o in (copied, opt)]
    assert steps == [3.0, 3.0], steps


def test_loading_a_state_without_any_parameters_state_warns():
    """A DCP template taken while gradients were set holds no optimizer state, and set_state_dict then
    loaded none, silently: SOAP went on as if new. An empty state now warns; a real one does not."""
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = SOAP(params, precondition_frequency=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Accelerate's prepare() loads a new SOAP's empty state back
        opt.load_state_dict(SOAP(params).state_dict())
    params[0].grad = torch.randn(4, 3)  # the DCP trap: the template was taken after a backward
    with pytest.warns(UserWarning, match="holds no parameter's state, so SOAP goes on as if new"):
        opt.load_state_dict(SOAP(params).state_dict())
    for _ in range(3):
        params[0].grad = torch.randn(4, 3)
        opt.step()
    saved = opt.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SOAP(params, precondition_frequency=2).load_state_dict(saved)


def _flags_per_block(state: dict, block_size: int) -> dict:
    """``state`` with every ``pending_ok_j`` in the layout soap_dist saved before its placements
    (9345cdf): one flag per row block for j = 0, a single flag for j >= 1."""
    old = copy.deepcopy(state)
    for entry in old["state"].values():
        for key in [k for k in entry if k.startswith("pending_ok_")]:
            rows = entry[key]
            entry[key] = rows[::block_size].clone() if key == "pending_ok_0" else rows[:1].clone()
    return old


def test_a_state_with_the_old_per_block_pending_flags_loads_and_continues_the_same():
    """A state saved with refresh_delay=1 while a basis waits for its install step, in the layout of
    the first soap_dist versions: it loaded with an IndexError from the middle of the copy."""
    init = [torch.randn(s) for s in SHAPES]
    grads = gradient_stream(SHAPES, 12)
    options = {"refresh_delay": 1, "block_size": 4}
    params, opt = _make(init, **options)
    _drive(params, opt, grads[:7])  # refreshed at step 6, installed at step 8: a basis waits
    state = copy.deepcopy(opt.state_dict())
    assert state["state"][0]["install_step"] >= 0 and state["state"][0]["pending_ok_0"].numel() == 6
    old = _flags_per_block(state, 4)
    assert old["state"][0]["pending_ok_0"].numel() == 2  # rows 0-3 and 4-5
    finals = []
    for saved in (state, old):
        params_c, opt_c = _make([p.detach().clone() for p in params], **options)
        opt_c.load_state_dict(saved)
        _drive(params_c, opt_c, grads[7:])
        finals.append(params_c)
    for a, b in zip(*finals, strict=True):
        assert torch.equal(a, b)
    old["state"][0]["pending_ok_0"] = torch.ones(5)  # neither layout: refused, naming the key
    _, fresh = _make(init, **options)
    with pytest.raises(ValueError, match=r"pending_ok_0 of .* covers 1 of the 2 rows of a block"):
        fresh.load_state_dict(old)
