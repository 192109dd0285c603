"""With no factor at all, SOAP is AdamW (after SOAP's skipped first call)."""

from __future__ import annotations

import pytest
import torch
from conftest import gradient_stream

from soap_dist import SOAP


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trajectory_equals_torch_adamw(dtype):
    shapes = [(8, 5), (7,), (3, 4, 2)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes]
    soap_params = [torch.nn.Parameter(w.clone()) for w in init]
    adam_params = [torch.nn.Parameter(w.clone()) for w in init]
    kw = dict(lr=1e-2, betas=(0.9, 0.99))
    soap = SOAP(soap_params, max_precond_dim=0, weight_decay=0.0, eps=1e-12, **kw)
    adam = torch.optim.AdamW(adam_params, weight_decay=0.0, eps=1e-12, **kw)
    grads = gradient_stream(shapes, 31)
    for p, g in zip(soap_params, grads[0], strict=True):  # SOAP's first call: no update
        p.grad = g.to(dtype)
    soap.step()
    for p, w in zip(soap_params, init, strict=True):
        assert torch.equal(p.detach(), w)
    for step_grads in grads[1:]:
        for ps in (soap_params, adam_params):
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.to(dtype)
        soap.step()
        adam.step()
        for a, b in zip(soap_params, adam_params, strict=True):
            rel = ((a - b).norm() / b.norm()).item()
            assert rel <= 1e-6, rel
