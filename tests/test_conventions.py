"""torch.optim's generic conventions, which every optimizer is held to (issue 12): copies continue
bitwise, state_dict hooks run, foreign entries of ``opt.state`` survive, saved param_names load,
a Python-number ``step`` loads, and a tiny weight decay does not overflow."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from soap_dist import SOAP

KW = dict(lr=0.01, precondition_frequency=2, fused=False, refresh_delay=1)


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(6, 4, generator=gen)),
        torch.nn.Parameter(torch.randn(4, generator=gen)),
    ]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(12)]
    return params, grads


def _run(opt, grads):
    params = [p for g in opt.param_groups for p in g["params"]]
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def test_deepcopy_pickle_and_torch_save_continue_bitwise():
    params, grads = _problem()
    opt = SOAP(params, **KW)
    _run(opt, grads[:5])  # mid-way: a refreshed basis waits for its install step
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    copies.append(torch.load(buffer, weights_only=False))
    want = _run(opt, grads[5:])
    for other in copies:
        assert other.refresh_delay == 1 and other.fused is False
        got = _run(other, grads[5:])
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_state_dict_hooks_run():
    params, grads = _problem()
    opt = SOAP(params, **KW)
    _run(opt, grads[:3])
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("post") or {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: calls.append("load_pre") or {k: v for k, v in sd.items() if k != "extra"}
    )
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert calls == ["pre", "post", "load_pre", "load_post"]


def test_foreign_state_entries_and_param_names_survive_a_round_trip():
    params, grads = _problem()
    opt = SOAP([("w", params[0]), ("b", params[1])], **KW)
    _run(opt, grads[:3])
    opt.state["lookahead"] = {"alpha": 0.5}
    sd = opt.state_dict()
    assert sd["state"]["lookahead"] == {"alpha": 0.5}
    other_params, _ = _problem()
    other = SOAP(other_params, **KW)
    other.load_state_dict(sd)
    assert other.state["lookahead"] == {"alpha": 0.5}
    assert other.param_groups[0]["param_names"] == ["w", "b"]


def test_a_python_number_step_loads():
    params, grads = _problem()
    opt = SOAP(params, **KW)
    _run(opt, grads[:4])
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = int(entry["step"].item())
        entry["initialized"] = 1.0
        entry["install_step"] = int(entry["install_step"].item())
    other_params, _ = _problem()
    other = SOAP(other_params, **KW)
    other.load_state_dict(sd)
    assert [int(e["step"]) for e in other.state_dict()["state"].values()] == [3, 3]


def test_a_tiny_weight_decay_does_not_overflow():
    for wd in (1e-40, 1e-30, 0.01):
        params, grads = _problem()
        opt = SOAP(params, **{**KW, "weight_decay": wd})
        got = _run(opt, grads)
        assert all(bool(torch.isfinite(p).all()) for p in got), wd
    # the tiny decay ends where no decay ends (1 - 1e-42 is 1 in float32)
    params, grads = _problem()
    none = _run(SOAP(params, **{**KW, "weight_decay": 0.0}), grads)
    params, grads = _problem()
    tiny = _run(SOAP(params, **{**KW, "weight_decay": 1e-40}), grads)
    assert all(torch.equal(a, b) for a, b in zip(none, tiny, strict=True))


def test_a_tensor_listed_twice_is_refused():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="same tensor twice"):
        SOAP([w, w])
    named = list(torch.nn.Linear(2, 3).named_parameters())  # (name, tensor) pairs, the tensor repeated
    with pytest.raises(ValueError, match="same tensor twice"):
        SOAP(named + named)
    with pytest.raises(ValueError, match="same tensor twice"):
        SOAP([{"params": [("a", w), ("b", w)]}])


@pytest.mark.parametrize("named", [False, True])
def test_a_group_given_a_generator_holds_its_parameters(named):
    # {"params": model.parameters()}: the duplicate check read the generator, torch got it empty, and
    # the optimizer stepped nothing, without a word
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    params = model.named_parameters() if named else model.parameters()
    opt = SOAP([{"params": params, "lr": 0.01}], precondition_frequency=1)
    assert len(opt.param_groups[0]["params"]) == 2
    for _ in range(2):
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
