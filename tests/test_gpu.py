"""GPU-only checks (skipped without CUDA): no host sync in an ordinary step; GPU agrees with CPU."""

from __future__ import annotations

import pytest
import torch

from soap_dist import SOAP

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = [(48, 48), (48,), (64, 64), (32, 32)]  # square: full-rank factors from the first call


def _params(device):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]


def _grads(steps):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]


def test_ordinary_step_has_no_host_sync():
    params = _params("cuda")
    opt = SOAP(params, precondition_frequency=10)
    grads = _grads(4)
    for step_grads in grads[:3]:  # first call, then two steps (compilation happens here)
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.cuda()
        opt.step()
    for p, g in zip(params, grads[3], strict=True):
        p.grad = g.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_matches_cpu_in_full_fp32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        results = []
        for device in ("cpu", "cuda"):
            params = _params(device)
            opt = SOAP(params, precondition_frequency=3)
            for step_grads in _grads(20):
                for p, g in zip(params, step_grads, strict=True):
                    p.grad = g.to(device)
                opt.step()
            results.append([p.detach().cpu() for p in params])
        for a, b in zip(*results, strict=True):
            assert ((a - b).norm() / a.norm()).item() < 1e-4
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
