"""Options: every bad value is refused with a message naming it, before anything changes, including
values a param-group edit or a checkpoint brings after the first step."""

from __future__ import annotations

import copy

import pytest
import torch

from soap_dist import SOAP


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3))]


def _step(opt, params):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"betas": ("a", 0.9)}, "betas"),
        ({"betas": 0.9}, "betas"),
        ({"eps": "1e-8"}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"lr": True}, "lr"),
        ({"precondition_frequency": True}, "precondition_frequency"),
        ({"block_size": True}, "block_size"),
        ({"merge_dims": "yes"}, "merge_dims"),
        ({"fused": "auto"}, "fused"),
        ({"owner_scope": "replica"}, "owner_scope"),
        ({"placement": "zero"}, "placement"),
    ],
)
def test_bad_values_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"invalid {name}="):
        SOAP(_params(), **kwargs)


def test_numpy_and_tensor_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    SOAP(_params(), betas=(np.float32(0.9), 0.95), lr=torch.tensor(0.01))


def test_a_frequency_edited_below_the_refresh_delay_is_refused_at_the_next_step():
    """Else every refreshed basis would wait past the next refresh: none would ever be installed."""
    params = _params()
    opt = SOAP(params, refresh_delay=3, precondition_frequency=4)
    _step(opt, params)
    opt.param_groups[0]["precondition_frequency"] = 2
    with pytest.raises(
        ValueError, match=r"invalid refresh_delay=3; expected an integer < precondition_frequency \(2"
    ):
        _step(opt, params)


def test_a_checkpoint_whose_frequency_is_below_the_refresh_delay_is_refused_before_anything_changes():
    params = _params()
    saver = SOAP(params, precondition_frequency=2)
    _step(saver, params)
    loader = SOAP(_params(), refresh_delay=5)
    with pytest.raises(ValueError, match="saved param group does not fit.*refresh_delay=5"):
        loader.load_state_dict(saver.state_dict())
    assert loader.param_groups[0]["precondition_frequency"] == 10  # untouched


def test_a_layout_option_edited_after_the_first_step_is_refused_and_can_be_set_back():
    params = _params()
    opt = SOAP(params)
    _step(opt, params)
    opt.param_groups[0]["max_precond_dim"] = 1
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['max_precond_dim'\] changed from 10000 to 1"):
        _step(opt, params)
    opt.param_groups[0]["max_precond_dim"] = 10000
    _step(opt, params)
    opt.param_groups[0]["lr"] = 1e-4  # a hyperparameter, not the layout: fine
    _step(opt, params)


def test_a_whole_optimizer_option_in_a_param_group_is_refused():
    with pytest.raises(ValueError, match="'placement' in a param group has no effect"):
        SOAP([{"params": _params(), "placement": "owner"}])


def test_loading_something_else_than_an_optimizer_state_says_so():
    opt = SOAP(_params())
    with pytest.raises(ValueError, match="expected an optimizer state_dict"):
        opt.load_state_dict(torch.nn.Linear(2, 2).state_dict())


def test_a_copy_keeps_every_keyword_option():
    opt = SOAP(_params(), owner_scope="shard_group", refresh_schedule="staggered", refresh_delay=1)
    again = copy.deepcopy(opt)
    assert (again.owner_scope, again.refresh_schedule, again.refresh_delay) == ("shard_group", "staggered", 1)


def test_the_whole_optimizer_options_are_the_signatures_keyword_only_ones_with_its_defaults():
    """One list serves copies (optimizer_state) and the param-group check; it must not drift from
    SOAP's signature."""
    import inspect

    from soap_dist.options import WHOLE_OPTIMIZER_DEFAULTS

    signature = inspect.signature(SOAP.__init__).parameters.values()
    keyword_only = {p.name: p.default for p in signature if p.kind is p.KEYWORD_ONLY}
    assert keyword_only.pop("block_size") is None  # a param-group option
    assert keyword_only == WHOLE_OPTIMIZER_DEFAULTS
