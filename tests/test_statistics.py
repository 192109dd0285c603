"""The factor statistics C_j(x) against a plain float64 product, on both sides of the split size."""

from __future__ import annotations

import pytest
import torch

from soap_dist import kernels


def plain_statistic(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum over every block dim but ``dim`` of x x^T, written out with einsum in float64."""
    x = x.double().movedim(dim + 1, 1)
    rows = x.reshape(x.shape[0], x.shape[1], -1)
    return torch.einsum("bik,bjk->bij", rows, rows)


@pytest.mark.parametrize("d", [kernels.SYMMETRIC_SPLIT_MIN - 1, kernels.SYMMETRIC_SPLIT_MIN, 515])
def test_statistic_matches_plain_product(d):
    x = torch.randn(2, d, 3, dtype=torch.float64)
    got = kernels.statistic(x, 0)
    torch.testing.assert_close(got, plain_statistic(x, 0), rtol=1e-12, atol=1e-12)
    if d >= kernels.SYMMETRIC_SPLIT_MIN:  # the lower block is the upper one mirrored, bit for bit
        assert torch.equal(got[:, d // 2 :, : d // 2], got[:, : d // 2, d // 2 :].mT)


@pytest.mark.parametrize("d", [kernels.SYMMETRIC_SPLIT_MIN - 1, 515])
@pytest.mark.parametrize("dim", [0, 1])
def test_accumulate_statistic_matches_plain_update(d, dim):
    x = torch.randn(3, 4, d, 2, dtype=torch.float64).movedim(2, dim + 1).contiguous()
    size = x.shape[dim + 1]
    old = torch.randn(3, size, size, dtype=torch.float64)
    old = old + old.mT
    beta = 0.9
    want = beta * old + (1 - beta) * plain_statistic(x, dim)
    got = kernels.accumulate_statistic(old.clone(), x, dim, beta)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_split_accumulates_into_a_strided_store_view():
    """The engine accumulates into slices of a store: the split must write through the view."""
    d = kernels.SYMMETRIC_SPLIT_MIN
    store = torch.zeros(4, d, d, dtype=torch.float64)
    x = torch.randn(2, d, 3, dtype=torch.float64)
    kernels.accumulate_statistic(store[1:3], x, 0, 0.5)
    torch.testing.assert_close(store[1:3], 0.5 * plain_statistic(x, 0), rtol=1e-12, atol=1e-12)
    assert not store[0].any() and not store[3].any()


def test_statistic_ignores_garbage_in_a_fresh_output():
    """statistic() fills an uninitialized buffer with beta = 0: NaN garbage must not leak in."""
    d = kernels.SYMMETRIC_SPLIT_MIN + 1
    x = torch.randn(1, d, 2, dtype=torch.float64)
    torch.testing.assert_close(kernels.statistic(x, 0), plain_statistic(x, 0), rtol=1e-12, atol=1e-12)
    nan_store = torch.full((1, d, d), float("nan"), dtype=torch.float64)
    got = kernels.accumulate_statistic(nan_store, x, 0, 0.0)
    assert torch.isfinite(got).all()


def test_a_factor_shared_by_row_blocks_is_summed_without_repeated_rows_on_cuda(monkeypatch):
    # index_add_ with a repeated row sums in no fixed order on CUDA: replicas computing the same
    # update (owner_scope="shard_group") would drift apart. An 8 x 4 weight in row blocks of 4 has
    # one column factor fed by two blocks. Where the blocks are summed first (CUDA; here CPU made to
    # take that path), every index_add_ names each row once, and the result is the in-order one's.
    from soap_dist import SOAP
    from soap_dist.engine import step

    def run(summed_first: tuple[str, ...]) -> tuple[list[list[int]], torch.Tensor]:
        monkeypatch.setattr(step, "SUMMED_FIRST_ON", summed_first)
        calls: list[list[int]] = []

        def spy(self, dim, index, source, **kw):
            calls.append(index.tolist())
            return index_add(self, dim, index, source, **kw)

        monkeypatch.setattr(torch.Tensor, "index_add_", spy)
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
        opt = SOAP([w], block_size=4, precondition_frequency=1, fused=False, factor_dtype=torch.float64)
        for _ in range(3):
            w.grad = torch.randn_like(w)
            opt.step()
        monkeypatch.setattr(torch.Tensor, "index_add_", index_add)
        return calls, w.detach().clone()

    index_add = torch.Tensor.index_add_
    in_order, expected = run(())
    assert any(len(set(c)) < len(c) for c in in_order)  # the CPU path: repeated rows, added in order
    summed, got = run(("cpu", "cuda"))
    assert summed and all(len(set(c)) == len(c) for c in summed), summed
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
