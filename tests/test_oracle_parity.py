"""soap_dist.SOAP against the independent float64 oracle (tests/oracle.py), 50 steps, full-rank problems."""

from __future__ import annotations

import pytest
import torch
from conftest import run_against_oracle

MATRICES = [(6, 6), (7, 7)]
CONV = [(4, 3, 3, 3)]  # every dim smaller than the product of the others: full-rank factors
VECTORS = [(5,)]

# Every case is full rank at every decomposition (the page: where a factor is rank-deficient its
# null-space eigenvectors are arbitrary, and two correct implementations, or one LAPACK build with
# batched and unbatched calls, may legitimately differ). 1-D factors start rank-1: see below.
CASES = {
    "defaults": ([(MATRICES + VECTORS, {})], {}),
    "conv": ([(CONV, {})], {}),
    "merge_channels_first": ([([(4, 3, 5, 6)], {})], dict(merge_dims=True, max_precond_dim=20)),
    "merge_channels_last": (
        [([(4, 3, 5, 6)], {})],
        dict(merge_dims=True, max_precond_dim=20, data_format="channels_last"),
    ),
    "strict_max_dim": ([([(6, 7), (7, 6)], {})], dict(max_precond_dim=6)),  # 6 gets a factor, 7 none
    "no_factors": ([(MATRICES + VECTORS, {})], dict(max_precond_dim=0)),
    "hyperparameters": (
        [(MATRICES + VECTORS, {})],
        dict(lr=1e-2, betas=(0.9, 0.99), shampoo_beta=0.8, eps=1e-6, weight_decay=0.1),
    ),
    "no_decay_no_bias_correction": ([(MATRICES, {})], dict(weight_decay=0.0, correct_bias=False)),
    "normalize_grads": ([(MATRICES + CONV, {})], dict(normalize_grads=True)),
    "groups": (
        [
            (MATRICES, dict(lr=1e-2, betas=(0.9, 0.95))),
            (VECTORS + CONV, dict(lr=2e-3, weight_decay=0.0)),
            ([(5, 5)], dict(shampoo_beta=0.5, normalize_grads=True, precondition_frequency=2)),
        ],
        {},
    ),
    "row_blocks": ([([(12, 5), (7,), (9, 4, 2)], {})], dict(block_size=4)),
    "row_blocks_uneven_merge": ([([(10, 3, 2)], {})], dict(block_size=3, merge_dims=True, max_precond_dim=8)),
}


@pytest.mark.parametrize("frequency", [1, 3, 10])
@pytest.mark.parametrize("case", sorted(CASES))
def test_float64_matches_oracle(case, frequency):
    groups, options = CASES[case]
    options = {"precondition_frequency": frequency, **options}
    groups = [(shapes, {**kw}) for shapes, kw in groups]
    err = run_against_oracle(groups, steps=50, **options)
    assert err <= 1e-9, f"{case} k={frequency}: relative error {err:.3e}"


# float32: only problems whose factors are full rank from the first call. A 1-D factor under
# precondition_1d starts as a rank-1 outer product, whose null-space eigenvectors are arbitrary, so two
# correct float32 implementations may legitimately differ there (the algorithm page says so).
FLOAT32_CASES = {
    "defaults": ([(MATRICES + VECTORS, {})], {}),
    "conv": ([(CONV, {})], {}),
    "groups": ([(MATRICES, dict(lr=1e-2)), (CONV, dict(weight_decay=0.0, normalize_grads=True))], {}),
    "row_blocks": ([([(12, 4), (8, 3, 2)], {})], dict(block_size=4)),
}


@pytest.mark.parametrize("case", sorted(FLOAT32_CASES))
def test_float32_matches_oracle(case):
    groups, options = FLOAT32_CASES[case]
    err = run_against_oracle(
        groups, steps=50, dtype=torch.float32, factor_dtype=torch.float32, precondition_frequency=3, **options
    )
    assert err <= 1e-4, f"{case}: relative error {err:.3e}"


ONE_D_CASES = {
    "precondition_1d": ([(MATRICES + VECTORS, {})], dict(precondition_1d=True)),
    "merge_to_one_dim": ([([(3, 4)], {})], dict(merge_dims=True)),
    "row_blocks_1d": ([([(12, 5), (7,)], {})], dict(block_size=4, precondition_1d=True)),
    # a factor larger than its block (d^2 > numel) starts rank-deficient too; its moment is carried
    # by two contractions instead of a transfer matrix
    "tall_matrices": ([([(8, 3), (9, 2), (3, 8)], {})], {}),
}


@pytest.mark.parametrize("case", sorted(ONE_D_CASES))
def test_float64_one_dim_factors_match_oracle(case, monkeypatch):
    """1-D factors (and factors larger than their block) start rank-deficient: the first eigh has an
    arbitrary null space.

    Both sides get the same deterministic tie-break (a small distinct diagonal added before eigh,
    which makes every eigenvector unique), and the first refresh comes once the factors are full
    rank (k = 14 > every 1-D length here), so the rest of the trajectory is well defined.
    """
    eigh = torch.linalg.eigh

    def tie_broken(a):
        d = a.shape[-1]
        scale = torch.diagonal(a, dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(1e-300)
        ramp = torch.linspace(1e-3, 2e-3, d, dtype=a.dtype)
        return eigh(a + torch.diag_embed(scale * ramp))

    monkeypatch.setattr(torch.linalg, "eigh", tie_broken)
    groups, options = ONE_D_CASES[case]
    err = run_against_oracle(groups, steps=50, precondition_frequency=14, **options)
    assert err <= 1e-9, f"{case}: relative error {err:.3e}"


@pytest.mark.parametrize("frequency", [1, 3])
def test_householder_qr_matches_oracle(frequency):
    err = run_against_oracle(
        [(MATRICES + CONV, {})], qr_method="householder", precondition_frequency=frequency
    )
    assert err <= 1e-9


def test_oracle_detects_a_wrong_optimizer():
    """The comparison can fail: a SOAP with a different beta2 is far from the oracle."""
    from conftest import SOAP, OracleSOAP, gradient_stream

    shapes = [(6, 6)]
    w = torch.randn(6, 6, dtype=torch.float64)
    oracle = OracleSOAP([w.clone()], precondition_frequency=3)
    p = torch.nn.Parameter(w.clone())
    opt = SOAP([p], precondition_frequency=3, betas=(0.95, 0.9), factor_dtype=torch.float64)
    for (g,) in gradient_stream(shapes, 20):
        oracle.step([g])
        p.grad = g
        opt.step()
    assert ((p.detach() - oracle.params[0]).norm() / oracle.params[0].norm()).item() > 1e-6


SPLIT_CASES = ["defaults", "conv", "merge_channels_last", "row_blocks", "groups"]


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_float64_matches_oracle_with_split_statistics(case, monkeypatch):
    """Factors of every size take the symmetric two-halves statistic path (normally d >= 512 only)."""
    from soap_dist import kernels

    monkeypatch.setattr(kernels, "SYMMETRIC_SPLIT_MIN", 2)
    groups, options = CASES[case]
    err = run_against_oracle(groups, steps=50, precondition_frequency=3, **options)
    assert err <= 1e-9, f"{case}: relative error {err:.3e}"
