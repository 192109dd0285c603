"""The GEMM-form CholeskyQR2 (soap_dist.qr) against float64 eigh, with tensor-core arithmetic emulated.

``qr.EMULATE_TF32`` runs the CUDA path on CPU float32: every product's inputs rounded to TF32, as
tensor cores read them, with float32 sums. The refresh iterated from a perturbed eigenbasis must
reach float64 eigh's eigenvectors as closely as float32 Householder QR (LAPACK) does, on factors
with condition numbers 1e6 to 1e10. A control shows that plain TF32 products (no 3x split) fail.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from soap_dist import SOAP, linalg, qr
from soap_dist.bench.qr_accuracy import errors, problem  # the problems and measures the bench prints

F64 = torch.float64


def _iterate(factors, basis, dtype, method, iterations):
    f, q = factors.to(dtype), basis.to(dtype)
    for _ in range(iterations):
        q, _, ok = linalg.power_iteration_refresh(f, q, method)
        assert ok.all()
    return q.double()


def _errors(q, reference, lam, factors):
    """Orthogonality, eigenvector misalignment of the columns with lam >= 1e-4 lam_max, residual."""
    orth, _, misalign, residual = errors(q, reference, lam, factors)
    return orth, misalign, residual


def _well_conditioned(count: int, d: int, seed: int) -> torch.Tensor:
    """Seeded float32 matrices of condition about 2: a plain Gaussian one reaches condition 1e4 now
    and then, where float32 CholeskyQR2 rightly breaks down, and the tests below would flake."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, d, d, generator=gen) + 3 * d**0.5 * torch.eye(d)


def _blocked_cholesky(monkeypatch, on: bool) -> None:
    """qr.inverse_cholesky for every size, with leaves small enough that a d = 96 problem recurses."""
    if on:
        monkeypatch.setattr(qr, "BLOCKED_CHOLESKY_FROM", 0)
        monkeypatch.setattr(qr, "CHOLESKY_LEAF", 32)


@pytest.mark.parametrize("blocked", [False, True], ids=["cusolver_cholesky", "blocked_cholesky"])
@pytest.mark.parametrize("cond", [1e6, 1e8, 1e10])
def test_tensor_core_refresh_reaches_float64_eigh_like_lapack(cond, blocked, monkeypatch):
    factors, reference, lam, near = problem(2, 96, cond)
    lapack = _errors(_iterate(factors, near, torch.float32, "householder", 40), reference, lam, factors)
    monkeypatch.setattr(qr, "EMULATE_TF32", True)
    _blocked_cholesky(monkeypatch, blocked)
    gemm = _errors(_iterate(factors, near, torch.float32, "cholesky_qr2", 40), reference, lam, factors)
    orth, misalign, residual = gemm
    assert orth < 2e-6, gemm  # float32 Householder's is ~6e-7
    assert misalign < max(3 * lapack[1], 1e-6), (gemm, lapack)
    assert residual < 1.5 * lapack[2] + 1e-7, (gemm, lapack)


def test_plain_tf32_products_would_fail_the_same_check(monkeypatch):
    """The control: one TF32 product per matmul (no low parts) breaks the orthogonality check above
    (the Cholesky of a TF32 Gram matrix breaks down, or Q is orthogonal only to ~1e-3)."""
    factors, reference, lam, near = problem(2, 96, 1e8)
    monkeypatch.setattr(qr, "EMULATE_TF32", True)
    monkeypatch.setattr(qr, "accurate_matmul", lambda a, b: qr._tf32_bmm(a, b))
    monkeypatch.setattr(qr, "accurate_gram", lambda x: qr._tf32_bmm(x.mT, x))
    f, q = factors.float(), near.float()
    for _ in range(10):
        q, _, ok = linalg.power_iteration_refresh(f, q, "cholesky_qr2", fallback=False)
    orth, _, _ = _errors(q.double(), reference, lam, factors)
    assert not (ok.all() and orth < 2e-6), (ok, orth)


@pytest.mark.parametrize("d", [40, 64, 65, 200, 257, 768, 1536])  # leaves, levels, halves
def test_lower_inverse_is_the_inverse(d):
    gen = torch.Generator().manual_seed(d)
    a = torch.randn(3, d, d, dtype=F64, generator=gen)
    lower = torch.linalg.cholesky(a @ a.mT + d * torch.eye(d, dtype=F64))
    inverse = qr.lower_inverse(lower)
    assert torch.equal(inverse, inverse.tril())
    torch.testing.assert_close(inverse @ lower, torch.eye(d, dtype=F64).expand(3, d, d), atol=1e-12, rtol=0)


@pytest.mark.parametrize("d", [40, 96, 200, 257, 768])  # a leaf, aligned and odd halves, depth 4
def test_inverse_cholesky_is_the_inverse_of_the_cholesky_factor(d, monkeypatch):
    monkeypatch.setattr(qr, "CHOLESKY_LEAF", 48)
    gen = torch.Generator().manual_seed(d)
    a = torch.randn(3, d, d, dtype=F64, generator=gen)
    spd = a @ a.mT + d * torch.eye(d, dtype=F64)
    inverse, ok = qr.inverse_cholesky(spd)
    assert ok.all() and torch.equal(inverse, inverse.tril())
    expected = torch.linalg.inv(torch.linalg.cholesky(spd))
    torch.testing.assert_close(inverse, expected, atol=1e-12 * expected.abs().max().item(), rtol=0)


def test_inverse_cholesky_flags_a_breakdown_in_either_half(monkeypatch):
    monkeypatch.setattr(qr, "CHOLESKY_LEAF", 32)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 100, 100, dtype=F64, generator=gen)
    spd = a @ a.mT + torch.eye(100, dtype=F64)
    spd[1, 10, 10] = -1.0  # not positive definite in the first half
    spd[2, 90, 90] = -50.0  # in the Schur complement of the second
    assert qr.inverse_cholesky(spd)[1].tolist() == [True, False, False]


@pytest.mark.parametrize("d", [12, 72])  # a leaf; halves, with the breakdown in the second
@pytest.mark.parametrize("blocked", [False, True], ids=["cusolver_cholesky", "blocked_cholesky"])
def test_a_breakdown_falls_back_to_householder_with_either_cholesky(d, blocked, monkeypatch):
    monkeypatch.setattr(qr, "EMULATE_TF32", True)
    _blocked_cholesky(monkeypatch, blocked)
    x = _well_conditioned(3, d, seed=d)
    x[1, :, d - 2] = x[1, :, d - 7]  # two equal columns: the Gram matrix is singular
    q, ok = qr.orthonormalize_(x.clone(), "cholesky_qr2")
    assert ok.all()
    torch.testing.assert_close(q[1], qr.householder(x[1:2].clone())[0], atol=1e-5, rtol=0)
    _, ok = qr.orthonormalize_(x.clone(), "cholesky_qr2", fallback=False)
    assert ok.tolist() == [True, False, True]


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_tf32_block_leaves_the_callers_matmul_precision_readable(precision):
    """Under "medium" the legacy flag is already on; writing it back made torch's getter raise
    ("mix of the legacy and new APIs"), which torch.compile's cache reads."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with qr.tf32_matmuls():
            assert torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)


TF32_SETUPS = {
    "default": "",
    "matmul fp32_precision tf32": "m.fp32_precision = 'tf32'",
    "generic fp32_precision tf32": "torch.backends.fp32_precision = 'tf32'",
    "matmul fp32_precision ieee": "m.fp32_precision = 'ieee'",
    "legacy high": "torch.set_float32_matmul_precision('high')",
    "generic tf32, matmul ieee": "torch.backends.fp32_precision = 'tf32'; m.fp32_precision = 'ieee'",
}


@pytest.mark.parametrize("setup", list(TF32_SETUPS))
def test_tf32_block_works_under_either_settings_api_and_restores_it(setup):
    """Through torch's newer ``fp32_precision`` settings the legacy ``allow_tf32`` read raises; the
    block read it, so every CUDA refresh raised for such a caller. Each setup in a fresh process:
    torch's precision settings cannot be put back to their defaults portably."""
    code = f"""
import torch
from soap_dist import qr
m = torch.backends.cuda.matmul
def state():
    out = []
    for read in (lambda: torch.backends.fp32_precision, lambda: m.fp32_precision, lambda: m.allow_tf32,
                 torch.get_float32_matmul_precision):
        try:
            out.append(read())
        except RuntimeError:
            out.append("refused")
    return out
{TF32_SETUPS[setup]}
before = state()
with qr.tf32_matmuls():
    assert m.fp32_precision == "tf32", m.fp32_precision
assert state() == before, (state(), before)
with qr.tf32_matmuls():  # twice: nothing left over from the first
    assert m.fp32_precision == "tf32"
assert state() == before, (state(), before)
print("ok", before)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("own", ["", "torch.backends.cuda.matmul.fp32_precision = 'ieee'"])
def test_after_the_tf32_block_matmuls_follow_the_generic_setting_as_before(own):
    """torch.backends.fp32_precision reaches matmuls that have no setting of their own, and only
    those; the block's restore gave them one ("ieee"), so a later generic "tf32" no longer reached
    them (and a rule from the value read, which reads through, took an own "ieee" for none)."""
    code = f"""
import torch
torch.backends.fp32_precision = "ieee"
{own}
if BLOCK:
    from soap_dist import qr
    with qr.tf32_matmuls():
        pass
torch.backends.fp32_precision = "tf32"
print(torch.backends.cuda.matmul.fp32_precision)
"""
    seen = []
    for block in (False, True):
        run = [sys.executable, "-c", code.replace("BLOCK", str(block))]
        proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen.append(proc.stdout.split())
    assert seen[1] == seen[0] == (["ieee"] if own else ["tf32"]), seen


def test_round_tf32_keeps_ten_mantissa_bits():
    x = torch.randn(1000) * torch.logspace(-20, 20, 1000)
    rounded = qr.round_tf32(x)
    assert ((rounded.view(torch.int32) & 8191) == 0).all()
    assert ((rounded - x).abs() <= x.abs() * 2.0**-11).all()


def test_emulated_gram_is_symmetric_and_float32_accurate(monkeypatch):
    x = torch.randn(2, 70, 70)
    monkeypatch.setattr(qr, "EMULATE_TF32", True)
    gram = qr.accurate_gram(x)
    assert torch.equal(gram, gram.mT)
    exact = x.double().mT @ x.double()
    assert ((gram.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6


@pytest.mark.parametrize("emulate", [False, True])
def test_without_fallback_a_breakdown_is_reported_not_redone(emulate, monkeypatch):
    """fallback=False (the refresh on a side stream) flags the matrix whose Cholesky breaks down and
    returns its input; with the fallback it gets Householder's Q, which a later redo reproduces."""
    monkeypatch.setattr(qr, "EMULATE_TF32", emulate)
    x = _well_conditioned(3, 12, seed=12)
    x[1, :, 5] = x[1, :, 2]  # two equal columns: the Gram matrix is singular
    with_fallback, ok = qr.orthonormalize_(x.clone(), "cholesky_qr2")
    assert ok.all()
    torch.testing.assert_close(with_fallback[1], qr.householder(x[1:2].clone())[0], atol=1e-5, rtol=0)
    without, ok = qr.orthonormalize_(x.clone(), "cholesky_qr2", fallback=False)
    assert ok.tolist() == [True, False, True]
    torch.testing.assert_close(without[[0, 2]], with_fallback[[0, 2]], atol=0, rtol=0)
    assert torch.equal(without[1], x[1])  # the input comes back, for a redo on the host's word
    redone, ok = qr.orthonormalize_(without[1:2].clone(), "householder")
    assert ok.all() and torch.equal(redone[0], with_fallback[1])


def test_without_fallback_a_nonfinite_matrix_comes_back_nan():
    x = torch.randn(2, 6, 6)
    x[0, 1, 1] = float("inf")
    q, ok = qr.orthonormalize_(x, "cholesky_qr2", fallback=False)
    assert ok.tolist() == [False, True] and q[0].isnan().all() and q[1].isfinite().all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("blocked", [False, True], ids=["cusolver_cholesky", "blocked_cholesky"])
@pytest.mark.parametrize("cond", [1e6, 1e10])
def test_cuda_tensor_core_refresh_reaches_float64_eigh_like_cusolver(cond, blocked, monkeypatch):
    """The real thing: 3xTF32 products on tensor cores against cuSOLVER's float32 Householder."""
    _blocked_cholesky(monkeypatch, blocked)
    factors, reference, lam, near = problem(2, 256, cond)
    results = {}
    for method in ("householder", "cholesky_qr2"):
        q = _iterate(factors.cuda(), near.cuda(), torch.float32, method, 40).cpu()
        results[method] = _errors(q, reference, lam, factors)
    orth, misalign, residual = results["cholesky_qr2"]
    assert orth < 2e-6, results
    assert misalign < max(3 * results["householder"][1], 1e-6), results
    assert residual < 1.5 * results["householder"][2] + 1e-7, results


def _train_mlp(qr_method: str, emulate: bool, perturb: float = 0.0, steps: int = 80) -> float:
    torch.manual_seed(0)
    x = torch.randn(512, 48)
    y = torch.tanh(x @ torch.randn(48, 32))
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + perturb)
    opt = SOAP(model.parameters(), lr=3e-3, precondition_frequency=5, qr_method=qr_method, fused=False)
    previous, qr.EMULATE_TF32 = qr.EMULATE_TF32, emulate
    try:
        for _ in range(steps):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        qr.EMULATE_TF32 = previous
    assert opt.stats()["refresh_failures"] == 0
    return loss.item()


def test_training_on_the_tensor_core_qr_stays_within_the_runs_own_sensitivity():
    """A float32 MLP trained with the CUDA default (CholeskyQR2 in emulated 3xTF32) against LAPACK
    Householder: the gap is measured against what a 1e-6 change of the initial weights does to the
    same run (SOAP amplifies rounding through the eigenvalue sort, so no fixed tolerance is fair)."""
    lapack = _train_mlp("householder", emulate=False)
    tensor_core = _train_mlp("cholesky_qr2", emulate=True)
    sensitivity = max(abs(_train_mlp("householder", False, d) - lapack) for d in (1e-6, -1e-6))
    assert lapack < 0.6 and abs(tensor_core - lapack) <= 2 * sensitivity, (lapack, tensor_core, sensitivity)
