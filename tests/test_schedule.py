"""refresh_schedule="staggered": each parameter refreshes every k steps at a fixed phase, balanced by
cost, equal to the oracle given the same phases (and to "all" when every phase is 0)."""

from __future__ import annotations

import pytest
import torch
from conftest import gradient_stream
from oracle import OracleSOAP

from soap_dist import SOAP
from soap_dist.layout import plan_param
from soap_dist.plan import SINGLE, build_plan
from soap_dist.plan.schedule import refresh_phases

SHAPES = [(8, 8), (7, 7), (6, 6), (6, 6), (5, 5), (7,), (4, 4)]  # square: full-rank factors
K = 4


def _layouts(shapes):
    opts = dict(max_precond_dim=10000, merge=False, precondition_1d=False, data_format="channels_first")
    return [plan_param(i, 0, f"p{i}", s, block_size=None, **opts) for i, s in enumerate(shapes)]


def _phases(shapes, k=K):
    return refresh_phases(build_plan(_layouts(shapes), SINGLE), [k] * len(shapes), "staggered")


def test_staggered_equals_the_oracle_with_the_same_phases():
    phases = _phases(SHAPES)
    assert len(set(phases)) > 1  # really staggered
    gen = torch.Generator().manual_seed(0)
    inits = [torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES]
    kw = dict(lr=0.01, precondition_frequency=K, weight_decay=0.01)
    oracle = OracleSOAP([w.clone() for w in inits], phases=phases, **kw)
    params = [torch.nn.Parameter(w.clone()) for w in inits]
    opt = SOAP(params, factor_dtype=torch.float64, fused=False, refresh_schedule="staggered", **kw)
    for grads in gradient_stream(SHAPES, 30):
        oracle.step(grads)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    err = max(((p.detach() - w).norm() / w.norm()).item() for p, w in zip(params, oracle.params, strict=True))
    assert err <= 1e-9
    # and the test can fail: the reference schedule is a different trajectory
    unstaggered = OracleSOAP([w.clone() for w in inits], **kw)
    for grads in gradient_stream(SHAPES, 30):
        unstaggered.step(grads)
    far = max(
        ((p.detach() - w).norm() / w.norm()).item() for p, w in zip(params, unstaggered.params, strict=True)
    )
    assert far > 1e-6


def test_phases_spread_the_refresh_cost_over_the_k_steps():
    shapes = [(16, 16)] * 8 + [(8,)]  # 8 equal costs, and a vector with no factor (cost 0)
    phases = _phases(shapes)
    assert sorted(phases[:8]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert phases[8] == 0
    assert refresh_phases(build_plan(_layouts(shapes), SINGLE), [K] * 9, "all") == [0] * 9


def test_owners_with_one_parameter_each_still_spread_over_the_k_steps():
    """At W near the number of matrices each owner holds one: per-owner balance alone put every one
    at phase 0 ("all" again, every broadcast at one step); ties now go to the least loaded phase."""
    from soap_dist.plan import Topology

    shapes = [(16, 16)] * 4 + [(8, 8)] * 4
    plan = build_plan(_layouts(shapes), Topology("replicated", 8, 1, 0))
    assert len({e.owner for e in plan.entries}) == 8  # one parameter per owner
    phases = refresh_phases(plan, [K] * len(shapes), "staggered")
    assert sorted(phases[:4]) == [0, 1, 2, 3] and sorted(phases[4:]) == [0, 1, 2, 3], phases


def test_each_parameter_still_refreshes_every_k_steps():
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = SOAP(params, precondition_frequency=K, fused=False, refresh_schedule="staggered")
    for grads in gradient_stream(SHAPES, 1 + 3 * K):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.float()
        opt.step()
    installs = list(opt.stats()["installed_at"])
    by_param: dict[int, list[int]] = {}
    for i, step in installs:
        by_param.setdefault(i, []).append(step)
    for i, steps in by_param.items():
        assert all(b - a == K for a, b in zip(steps, steps[1:], strict=False)), (i, steps)
        assert len(steps) == 3, (i, steps)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="refresh_schedule"):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2))], refresh_schedule="sometimes")
