"""Nothing the optimizer keeps grows with the step count (stats()["installed_at"] included)."""

from __future__ import annotations

from collections import deque

import torch

from soap_dist import SOAP
from soap_dist.engine import INSTALLED_AT_KEPT

STEPS = 5000  # ~1 ms a step on a slow 2-core machine; 4 params x 5000 refreshes: ~5x the bound in installs
CONTAINERS = (list, tuple, dict, set, frozenset, deque)


def _sizes(obj, path: str, out: dict[str, int], seen: set[int], depth: int = 0) -> dict[str, int]:
    """Length of every container reachable from obj's attributes (not inside tensors), by path."""
    if id(obj) in seen or depth > 4:
        return out
    seen.add(id(obj))
    if isinstance(obj, CONTAINERS):
        out[path] = len(obj)
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for n, (k, v) in enumerate(items):
            k = k if isinstance(k, (int, str)) else f"#{n}"  # a tensor key's repr changes with its values
            if isinstance(v, CONTAINERS) or hasattr(v, "__dict__") and not isinstance(v, torch.Tensor):
                _sizes(v, f"{path}[{k!r}]", out, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, torch.nn.Module, type)):
        for name, v in vars(obj).items():
            _sizes(v, f"{path}.{name}", out, seen, depth + 1)
    return out


def test_state_stays_bounded_over_thousands_of_refreshes():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(4)]
    opt = SOAP(params, lr=1e-3, precondition_frequency=1, fused=False)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(8)]
    sizes = {}
    for t in range(1, STEPS + 1):
        for k, p in enumerate(params):
            p.grad = grads[(t + k) % len(grads)]
        opt.step()
        if t in (STEPS // 2, STEPS):
            sizes[t] = _sizes(opt._engine, "engine", {}, set())
            sizes[t] |= _sizes({k: v for k, v in vars(opt).items() if k != "_engine"}, "opt", {}, set())
    stats = opt.stats()
    assert stats["bases_installed"] == 4 * 2 * (STEPS - 1)  # 4 params x 2 factors, refreshed every step
    assert 4 * (STEPS - 1) > 4 * INSTALLED_AT_KEPT  # the installs exceed the bound several times
    assert len(stats["installed_at"]) == INSTALLED_AT_KEPT
    assert stats["installed_at"][-1] == (3, STEPS)  # the most recent are kept (the first call is no step)
    assert sizes[STEPS // 2] == sizes[STEPS], {
        k: (v, sizes[STEPS][k]) for k, v in sizes[STEPS // 2].items() if sizes[STEPS].get(k) != v
    }
    assert sizes[STEPS]["engine.counters.installed_at"] == INSTALLED_AT_KEPT
    assert all(torch.isfinite(p).all() for p in params)
