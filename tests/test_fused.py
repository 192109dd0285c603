"""The compiled elementwise kernel computes what the eager one does (runs on CPU too, via inductor)."""

from __future__ import annotations

import pytest
import torch

from soap_dist import SOAP, kernels


@pytest.mark.slow
def test_fused_adam_direction_matches_eager():
    gen = torch.Generator().manual_seed(0)
    shape = (3, 8, 5)
    g = torch.randn(shape, generator=gen)
    m, v = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen)
    weight = torch.tensor([1.0, 0.0, 1.0])
    kw = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight=weight)
    m2, v2 = m.clone(), v.clone()
    eager = kernels.adam_direction(g, m, v, **kw)
    fused = kernels.fused_adam_direction()(g, m2, v2, **kw)
    torch.testing.assert_close(fused, eager)
    torch.testing.assert_close(m2, m)
    torch.testing.assert_close(v2, v)
    assert torch.equal(eager[1], torch.zeros(8, 5))


@pytest.mark.slow
def test_fused_optimizer_handles_many_shapes_without_recompiling_to_failure():
    """More distinct stack shapes than dynamo's recompile limit (8) must still train."""
    params = [torch.nn.Parameter(torch.randn(n, n + 1)) for n in range(2, 14)]
    params += [torch.nn.Parameter(torch.randn(n)) for n in range(2, 6)]
    opt = SOAP(params, fused=True, precondition_frequency=2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_default_does_not_compile_on_cpu():
    """fused=None compiles only where it pays (CUDA): the README quickstart starts at once on a CPU."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = SOAP([w])
    w.grad = torch.randn(4, 3)
    opt.step()
    assert opt._engine.fused is False
