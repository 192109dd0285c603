"""The compiled elementwise kernel computes what the eager one does (runs on CPU too, via inductor)."""

from __future__ import annotations

import pytest
import torch

from soap_dist import kernels


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
