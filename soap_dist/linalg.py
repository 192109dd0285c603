"""Pure matrix functions for the basis refresh: batched eigh, power iteration and QR.

Each function takes a batch of d x d matrices ``[N, d, d]`` and returns, beside its result, a
boolean ``ok`` per matrix, so the caller can keep the old basis where a decomposition failed.
The QR itself, and the float32-accurate products on tensor cores, are ``qr``'s. Nothing here knows
about parameters, ranks or torch.distributed. ``Solver`` is the interface the engine calls
(``EighPowerQR`` the default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .qr import accurate_matmul, all_finite, orthonormalize_

Tensor = torch.Tensor


def eigh_descending(factors: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors of ``factor + 1e-30 I``, columns by descending eigenvalue.

    A batch that fails is retried one matrix at a time in float64; a matrix that still fails
    (or is not finite) gets ``ok = False`` and a placeholder basis (a permutation) the caller
    should not install.
    """
    n, d = factors.shape[0], factors.shape[-1]
    eye = torch.eye(d, dtype=factors.dtype, device=factors.device)
    finite = all_finite(factors)
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
    ok &= all_finite(vectors)
    return vectors.flip(-1), ok


def power_iteration_refresh(
    factors: Tensor, bases: Tensor, method: str = "cholesky_qr2", fallback: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """One refresh step of the algorithm page for a batch of factors.

    lam = diag(Q^T F Q), pi = argsort(lam, descending), Q_new = Q of QR(F Q[:, pi]). diag(Q^T F Q)
    is read off the power iterate F Q itself (sum over rows of Q * FQ), saving two matmuls.
    Returns the new bases, the permutations pi ``[N, d]`` and ``ok`` per matrix. ``fallback`` is
    orthonormalize_'s (False: nothing read on the host).
    """
    power = accurate_matmul(factors, bases)
    estimated = (bases * power).sum(dim=-2)
    perm = torch.argsort(estimated, dim=-1, descending=True)
    power = power.gather(-1, perm[:, None, :].expand_as(power))
    # A NaN or Inf anywhere in a factor reaches the power iterate (its row of F Q; the bases are
    # finite), so orthonormalize_'s check of the iterate covers the factor too.
    new_bases, ok = orthonormalize_(power, method, fallback)
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
    """The reference's solver: eigh at the first call, then one power iteration + QR (``qr_method``).

    ``fallback=False`` is the refresh that never synchronises with the host (see qr.orthonormalize_).
    """

    qr_method: str = "householder"
    fallback: bool = True

    def first(self, factors: Tensor) -> tuple[Tensor, Tensor]:
        return eigh_descending(factors)

    def refresh(self, factors: Tensor, bases: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # looked up at call time, so that a test can substitute the module's function
        return power_iteration_refresh(factors, bases, self.qr_method, fallback=self.fallback)
