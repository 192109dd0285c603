"""Shape rules and the blocking rule, from shapes alone."""

from __future__ import annotations

import pytest

from soap_dist.layout import merge_dims, plan_param


def _plan(shape, **kw):
    options = dict(
        max_precond_dim=10000,
        merge=False,
        precondition_1d=False,
        data_format="channels_first",
        block_size=None,
    )
    options.update(kw)
    return plan_param(0, 0, "w", shape, **options)


@pytest.mark.parametrize(
    "shape, limit, merged",
    [
        ((768, 768), 10000, (768, 768)),
        ((3, 4), 10000, (12,)),
        ((64, 3, 3, 3), 100, (64, 27)),
        ((2, 20000, 3), 10000, (2, 20000, 3)),
        ((1, 1), 10, (1,)),
        ((50, 2, 3), 60, (50, 6)),
    ],
)
def test_merge_dims_is_greedy_and_strict(shape, limit, merged):
    assert merge_dims(shape, limit) == merged


def test_max_precond_dim_is_strict():
    assert _plan((6, 7), max_precond_dim=6).preconditioned == (True, False)


def test_embedding_has_only_its_column_factor_at_any_block_size():
    for block in (None, 1024, 4096):
        lay = _plan((50304, 768), block_size=block)
        assert lay.preconditioned == (False, True)
    assert _plan((50304, 768), block_size=1024).row_counts[-1] == 50304 - 49 * 1024


def test_one_dimensional_rules():
    assert _plan((7,)).preconditioned == (False,)
    assert _plan((7,), precondition_1d=True).preconditioned == (True,)
    assert _plan((7,), precondition_1d=True, max_precond_dim=6).preconditioned == (False,)
    assert _plan(()).block_shape == (1,)


def test_channels_last_permutes_before_merging():
    lay = _plan((8, 3, 3, 16), merge=True, data_format="channels_last", max_precond_dim=200)
    assert lay.permutation == (0, 3, 1, 2)
    assert lay.block_shape == (128, 9)


def test_row_blocks_cover_dim_zero():
    lay = _plan((10, 4), block_size=3)
    assert lay.row_counts == (3, 3, 3, 1) and lay.row_offsets == (0, 3, 6, 9)
    assert _plan((10, 4), block_size=16).row_counts == (10,)
