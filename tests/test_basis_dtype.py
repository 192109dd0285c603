"""basis_dtype=torch.bfloat16: bases stored (and rotations done) in bf16, statistics in float32.
Half the bases' bytes, a trajectory close to float32 bases', and checkpoints that load."""

from __future__ import annotations

import pytest
import torch

from soap_dist import SOAP


def _train(basis_dtype, steps=40, **kw):
    torch.manual_seed(0)
    x, y = torch.randn(256, 16), torch.randn(256, 8)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    opt = SOAP(
        model.parameters(), lr=0.01, precondition_frequency=5, fused=False, basis_dtype=basis_dtype, **kw
    )
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def test_bf16_bases_halve_the_bases_and_track_float32():
    full, opt32 = _train(None)
    half, opt16 = _train(torch.bfloat16)
    assert opt16.stats()["basis_bytes"] * 2 == opt32.stats()["basis_bytes"]
    assert opt16.stats()["factor_bytes"] == opt32.stats()["factor_bytes"]
    assert all(s.bases.dtype == torch.bfloat16 for s in opt16._engine.stores.values())
    assert half[-1] < 0.85 * half[0]  # it trains
    assert abs(half[-1] - full[-1]) <= 0.02 * full[-1], (half[-1], full[-1])


@pytest.mark.parametrize("basis_dtype", [None, torch.bfloat16])
def test_stats_count_the_stash_of_a_delayed_refresh(basis_dtype):
    """refresh_delay >= 1 keeps a second copy of the bases (and a permutation row per basis) until
    their install step: stats()["stash_bytes"] counts it; nothing without a delay."""
    _, plain = _train(basis_dtype, steps=12)
    _, delayed = _train(basis_dtype, steps=12, refresh_delay=1)
    assert plain.stats()["stash_bytes"] == 0
    stores = delayed._engine.stores.values()
    perms = sum(len(s.slots) * s.size * 8 + len(s.slots) for s in stores)  # int64 rows, bool flags
    assert delayed.stats()["stash_bytes"] == delayed.stats()["basis_bytes"] + perms


@pytest.mark.parametrize("delay", [0, 1])
def test_bf16_bases_round_trip_through_state_dict(delay):
    _, opt = _train(torch.bfloat16, steps=12, refresh_delay=delay)
    sd = opt.state_dict()
    _, other = _train(torch.bfloat16, steps=1, refresh_delay=delay)
    other.load_state_dict(sd)  # passes the orthogonality check at bf16's tolerance
    for a, b in zip(opt._engine.stores.values(), other._engine.stores.values(), strict=True):
        assert torch.equal(a.bases, b.bases)


def test_an_unsupported_basis_dtype_is_refused():
    with pytest.raises(ValueError, match="basis_dtype"):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2))], basis_dtype=torch.float16)
