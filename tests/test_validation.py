"""Bad input raises an error that names the argument and says what is allowed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soap_dist import SOAP


def _params():
    return [torch.nn.Parameter(torch.randn(4, 4))]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(shampoo_beta=1.0), "shampoo_beta"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(precondition_frequency=2.5), "precondition_frequency"),
        (dict(max_precond_dim=-1), "max_precond_dim"),
        (dict(data_format="nhwc"), "data_format"),
        (dict(block_size=0), "block_size"),
        (dict(refresh_delay=-1), "refresh_delay"),
        (dict(refresh_delay=10, precondition_frequency=10), "refresh_delay"),
        (dict(factor_dtype=torch.bfloat16), "factor_dtype"),
        (dict(qr_method="svd"), "qr_method"),
        (dict(lr=1e300), "lr"),  # overflowed the float32 step size mid-step, after the moments moved
        (dict(lr=torch.tensor(0.01, requires_grad=True)), r"lr.*pass lr\.detach\(\)"),
        (dict(lr=torch.tensor(0.01 + 0.5j)), "lr"),
        (dict(eps=torch.tensor(1e-8, requires_grad=True)), r"eps=.*requires grad: \.detach\(\) it"),
        (dict(weight_decay=torch.tensor(0.1, requires_grad=True)), "weight_decay"),
        (dict(shampoo_beta=torch.tensor(0.9, requires_grad=True)), "shampoo_beta"),
        (dict(refresh_delay=True), "refresh_delay"),
        (dict(collective_timeout=True), "collective_timeout"),
        (dict(collective_timeout=float("inf")), "collective_timeout"),
        (dict(process_group="world"), "process_group"),
        (dict(device_mesh="mesh"), "device_mesh"),
        (dict(precondition_frequency=np.int64(2)), r"precondition_frequency.*pass int\(value\)"),
    ],
)
def test_bad_hyperparameter_names_itself(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SOAP(_params(), **kwargs)


def test_bad_group_hyperparameter_names_itself():
    with pytest.raises(ValueError, match="betas"):
        SOAP([{"params": _params(), "betas": (0.9, 1.5)}])
    opt = SOAP([{"params": _params()}, {"params": [torch.nn.Parameter(torch.zeros(3, 2))]}])
    opt.param_groups[1]["lr"] = -3.0  # e.g. a broken scheduler: the message says which group
    opt.param_groups[0]["params"][0].grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"^SOAP: param_groups\[1\]: invalid lr=-3\.0; expected"):
        opt.step()


def test_complex_parameters_rejected():
    with pytest.raises(TypeError, match="complex"):
        SOAP([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SOAP(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_parameters_on_several_devices_rejected_with_a_message():
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = SOAP([p])
    p.grad = torch.randn(3, 3)
    opt.step()
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.randn(2)))
    opt.param_groups[0]["params"][-1].grad = torch.randn(2)
    with pytest.raises(RuntimeError, match="parameters changed"):
        opt.step()


def test_a_step_before_any_gradient_warns_once_naming_the_wrapped_model_case():
    """SOAP built before the model was wrapped holds the tensors the wrapper replaced: every step
    does nothing. torch.optim is silent; SOAP says so once, and never once training has begun."""
    import warnings

    stale = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = SOAP(stale)
    with pytest.warns(
        UserWarning, match=r"none of its 1 trainable parameters has had a gradient yet"
    ) as seen:
        opt.step()
        opt.step()
    assert len([w for w in seen if "had a gradient" in str(w.message)]) == 1
    assert seen[0].filename == __file__  # points at the caller's step()

    opt = SOAP([torch.nn.Parameter(torch.randn(4, 3))])
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # wraps opt.step once more
    with pytest.warns(UserWarning, match="had a gradient yet") as seen:
        opt.step()
    assert seen[0].filename == __file__ and scheduler.last_epoch == 0

    frozen = torch.nn.Parameter(torch.randn(4, 3), requires_grad=False)  # gradual unfreezing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SOAP([frozen]).step()

    live = torch.nn.Parameter(torch.randn(4, 3))
    opt = SOAP([live])
    live.grad = torch.randn(4, 3)
    opt.step()
    live.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # a step with no gradient mid-run (a skipped batch) is not the wrapped-model mistake


def test_the_warnings_caller_is_not_confused_with_a_package_named_like_torch(tmp_path, monkeypatch):
    """torchtitan, torchtune, torchvision ... sit beside torch in site-packages: a prefix test
    without the separator skipped their frames, and the warning named the wrong line."""
    import importlib.util

    from soap_dist import idle

    (tmp_path / "torch").mkdir()
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "torch" / "__init__.py"))
    package = tmp_path / "torchtitan_like"
    package.mkdir()
    (package / "loop.py").write_text("def call(level):\n    return level()\n")
    spec = importlib.util.spec_from_file_location("loop", package / "loop.py")
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    assert loop.call(idle.callers_level) == 1  # loop.call's own frame: the caller


def test_a_numpy_timeout_is_a_number_of_seconds():
    assert SOAP(_params(), collective_timeout=np.float32(5.0)).collective_timeout == 5.0


def test_a_refused_param_group_is_not_added():
    """Validated after torch appended it: it stayed, every later step() failed, and the parameters
    could not be added again."""
    opt = SOAP(_params())
    extra = torch.nn.Parameter(torch.randn(3, 3))
    for bad in ({"lr": -1.0}, {"betas": (0.9, 1.0)}, {"precondition_frequency": 0}):
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [extra], **bad})
        assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))]})
    opt.add_param_group({"params": [extra], "lr": 1e-3})  # corrected: added
    for p in opt._params():
        p.grad = torch.ones_like(p)
    opt.step()
    assert len(opt.param_groups) == 2


def test_an_lr_too_large_set_between_steps_changes_nothing():
    opt = SOAP(_params())
    p = opt.param_groups[0]["params"][0]
    for _ in range(3):
        p.grad = torch.randn(4, 4)
        opt.step()
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    opt.param_groups[0]["lr"] = 1e300
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(before[k], after[k]) for k in before)


MISSPELT = [("learning_rate", "lr"), ("precondition_freq", "precondition_frequency")]


@pytest.mark.parametrize("key, near", MISSPELT)
def test_a_misspelt_group_key_is_named_with_the_likely_one(key, near):
    message = rf"{key!r} is not an option of SOAP.*did you mean {near!r}"
    with pytest.warns(UserWarning, match=message) as caught:
        SOAP([{"params": _params(), key: 0.1}])
    assert caught[0].filename == __file__  # the user's line, not torch's


def test_keys_of_schedulers_and_frameworks_pass_quietly_and_whole_optimizer_keys_are_refused_later():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = SOAP([{"params": _params(), "initial_lr": 0.1, "name": "blocks"}])
    opt.param_groups[0]["placement"] = "owner"  # set between steps: it would be ignored
    opt.param_groups[0]["params"][0].grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match="'placement' in a param group has no effect"):
        opt.step()
