"""Pure matrix functions for the basis refresh: batched eigh, power iteration and QR.

Each function takes a batch of d x d matrices ``[N, d, d]`` and returns, beside its result, a
boolean ``ok`` per matrix, so the caller can keep the old basis where a decomposition failed.
Nothing here knows about parameters, ranks or torch.distributed. ``Solver`` is the interface the
engine calls (``EighPowerQR`` the default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

Tensor = torch.Tensor


def eigh_descending(factors: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors of ``factor + 1e-30 I``, columns by descending eigenvalue.

    A batch that fails is retried one matrix at a time in float64; a matrix that still fails
    (or is not finite) gets ``ok = False`` and an identity basis the caller should not install.
    """
    n, d = factors.shape[0], factors.shape[-1]
    eye = torch.eye(d, dtype=factors.dtype, device=factors.device)
    finite = _all_finite(factors)
    safe = torch.where(finite[:, None, None], factors, eye) + 1e-30 * eye
    try:
        _, vectors = torch.linalg.eigh(safe)
        ok = finite.clone()
    except RuntimeError:
        vectors = eye.expand(n, d, d).clone()
        ok = torch.zeros(n, dtype=torch.bool, device=factors.device)
        for i in range(n):
            try:
                _, v = torch.linalg.eigh(safe[i].double())
            except RuntimeError:
                continue
            vectors[i] = v.to(factors.dtype)
            ok[i] = finite[i]
    ok &= _all_finite(vectors)
    return vectors.flip(-1), ok


def _split_tf32(x: Tensor) -> tuple[Tensor, Tensor]:
    """x = hi + lo with hi exactly representable in TF32 (10 mantissa bits) and lo the exact rest."""
    hi = (x.view(torch.int32) & -8192).view(torch.float32)  # clear the 13 low mantissa bits
    return hi, x - hi


def _fast_path(x: Tensor) -> bool:
    return x.device.type == "cuda" and x.dtype == torch.float32 and x.dim() == 3


def _three_products(a_hi: Tensor, a_lo: Tensor, b_hi: Tensor, b_lo: Tensor) -> Tensor:
    backend = torch.backends.cuda.matmul
    previous = backend.allow_tf32
    backend.allow_tf32 = True
    try:
        out = torch.bmm(a_lo, b_hi)
        out.baddbmm_(a_hi, b_lo)
        return out.baddbmm_(a_hi, b_hi)
    finally:
        backend.allow_tf32 = previous


def accurate_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b to about float32 accuracy, fast on CUDA: three TF32 products (the "3xTF32" split).

    hi_a hi_b is exact in TF32; the two cross terms carry the low bits; lo_a lo_b (~2^-22 relative)
    is dropped. On tensor cores this is faster than an IEEE float32 GEMM. Elsewhere, and for
    float64, it is a plain matmul.
    """
    if not _fast_path(a):
        return a @ b
    return _three_products(*_split_tf32(a), *_split_tf32(b))


def accurate_gram(x: Tensor) -> Tensor:
    """x^T x like accurate_matmul(x.mT, x), splitting x once."""
    if not _fast_path(x):
        return x.mT @ x
    hi, lo = _split_tf32(x)
    return _three_products(hi.mT, lo.mT, hi, lo)


def _cholesky_qr(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One CholeskyQR pass: Q = X R^-1 with R^T R = X^T X. Returns Q, ok, and the Gram matrix."""
    gram = accurate_gram(x)
    lower, info = torch.linalg.cholesky_ex(gram)
    q = torch.linalg.solve_triangular(lower.mT, x, upper=True, left=False)
    return q, info == 0, gram


def orthonormalize_(x: Tensor, method: str = "cholesky_qr2") -> tuple[Tensor, Tensor]:
    """Q of the QR decomposition of each ``x`` in the batch, with R's diagonal made positive.

    Non-finite matrices in ``x`` are zeroed in place (and reported not ok).
    ``cholesky_qr2`` runs two CholeskyQR passes on the column-normalized matrix (QR(X D) has the
    same Q as QR(X) for a positive diagonal D, and the power iterate is ill-conditioned mostly by
    column scale). It is all batched matmuls and triangular solves; a matrix whose first pass is
    not accurate enough (Cholesky breakdown, or a second Gram matrix far from I) is redone with
    Householder QR (LAPACK/cuSOLVER geqrf), so the result is the QR factor either way. A
    Householder QR that raises reports its matrices not ok (the old bases stay), never escapes.
    """
    if method not in ("cholesky_qr2", "householder"):
        raise ValueError(f"qr_method must be 'cholesky_qr2' or 'householder', got {method!r}")
    finite = _all_finite(x)
    x.masked_fill_(~finite[:, None, None], 0.0)
    if method == "householder":
        q, q_finite = _safe_householder(x)
    else:
        norms = torch.linalg.vector_norm(x, dim=-2, keepdim=True)
        # x itself is kept for the Householder fallback: on a rank-deficient x, QR(x) and QR(x D)
        # differ in the arbitrary null-space columns, and the fallback must give QR(x) as the page does.
        first, ok_first, gram = _cholesky_qr(x / norms.masked_fill_(norms == 0, 1.0))
        del gram
        q, ok_second, gram = _cholesky_qr(first)
        del first
        torch.diagonal(gram, dim1=-2, dim2=-1).sub_(1.0)
        close = gram.abs_().flatten(1).amax(1) < 0.5
        del gram
        q_finite = _all_finite(q)
        bad = (finite & ~(ok_first & ok_second & close & q_finite)).nonzero().flatten()
        if bad.numel():  # a host sync, but only in the refresh
            q[bad], q_finite[bad] = _safe_householder(x[bad])
    retry = (finite & ~q_finite).nonzero().flatten()
    if retry.numel():  # a finite input whose QR failed or came out non-finite: once more in float64
        redone, good = _safe_householder(x[retry].double())
        q[retry] = redone.to(q.dtype)
        q_finite[retry] = good & _all_finite(q[retry])
    return q, finite & q_finite


def _all_finite(x: Tensor) -> Tensor:
    """One flag per matrix of the batch: no NaN or Inf in it."""
    return torch.isfinite(x).flatten(1).all(1)


def _householder(x: Tensor) -> Tensor:
    """Householder QR's Q with R's diagonal made positive.

    geqrf + householder_product rather than linalg.qr: R's diagonal is read off geqrf's output, so
    R is never copied out of it (linalg.qr's triu pass).
    """
    reflectors, tau = torch.geqrf(x)
    signs = torch.sign(torch.diagonal(reflectors, dim1=-2, dim2=-1))
    signs.masked_fill_(signs == 0, 1.0)
    return torch.linalg.householder_product(reflectors, tau).mul_(signs[..., None, :])


def _safe_householder(x: Tensor) -> tuple[Tensor, Tensor]:
    """_householder and a finite flag per matrix; a LAPACK/cuSOLVER error flags matrices, never escapes.

    A batch that raises is redone one matrix at a time, so only the matrices that fail get
    ``ok = False`` (with an identity Q the caller must not install), as eigh_descending does.
    """
    try:
        q = _householder(x)
        return q, _all_finite(q)
    except RuntimeError:
        pass
    eye = torch.eye(x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)
    q = eye.expand_as(x).clone()
    ok = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for i in range(x.shape[0]):
        try:
            q[i] = _householder(x[i : i + 1])[0]
        except RuntimeError:
            continue
        ok[i] = _all_finite(q[i : i + 1])[0]
    return q, ok


def power_iteration_refresh(
    factors: Tensor, bases: Tensor, method: str = "cholesky_qr2"
) -> tuple[Tensor, Tensor, Tensor]:
    """One refresh step of the algorithm page for a batch of factors.

    lam = diag(Q^T F Q), pi = argsort(lam, descending), Q_new = Q of QR(F Q[:, pi]). diag(Q^T F Q)
    is read off the power iterate F Q itself (sum over rows of Q * FQ), saving two matmuls.
    Returns the new bases, the permutations pi ``[N, d]`` and ``ok`` per matrix.
    """
    power = accurate_matmul(factors, bases)
    estimated = (bases * power).sum(dim=-2)
    perm = torch.argsort(estimated, dim=-1, descending=True)
    power = power.gather(-1, perm[:, None, :].expand_as(power))
    # A NaN or Inf anywhere in a factor reaches the power iterate (its row of F Q; the bases are
    # finite), so orthonormalize_'s check of the iterate covers the factor too.
    new_bases, ok = orthonormalize_(power, method)
    return new_bases, perm, ok


class Solver(Protocol):
    """What the engine asks of a refresh, in one place: a faster or compiled solver replaces this.

    Both take a batch ``[N, d, d]`` of symmetric factors and return per-matrix ``ok`` flags; the
    engine never installs a basis whose flag is false, so a solver reports failure, never raises.
    """

    def first(self, factors: Tensor) -> tuple[Tensor, Tensor]:
        """Orthonormal eigenbases, eigenvalues descending: (bases, ok)."""
        ...

    def refresh(self, factors: Tensor, bases: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Updated bases from the current ones: (bases, sort permutation [N, d], ok)."""
        ...


@dataclass(frozen=True)
class EighPowerQR:
    """The reference's solver: eigh at the first call, then one power iteration + QR (``qr_method``)."""

    qr_method: str = "householder"

    def first(self, factors: Tensor) -> tuple[Tensor, Tensor]:
        return eigh_descending(factors)

    def refresh(self, factors: Tensor, bases: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # looked up at call time, so that a test can substitute the module's function
        return power_iteration_refresh(factors, bases, self.qr_method)
