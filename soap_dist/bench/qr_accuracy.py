"""Accuracy of the refresh's QR against float64 eigh: ``python -m soap_dist.bench.qr_accuracy``.

Factors with eigenvalues log-spaced over a condition number (1e6, 1e8, 1e10), a start basis 1e-2
off their eigenbasis, and ``--iterations`` refreshes (power iteration + QR) by each QR: float64
Householder, float32 Householder (LAPACK), float32 CholeskyQR2 in IEEE products, and float32
CholeskyQR2 with the tensor-core arithmetic emulated on the CPU (``qr.EMULATE_TF32``: each product's
inputs rounded to TF32, the 3xTF32 split), which is what runs on CUDA. Reported against float64
eigh: orthogonality max|Q^T Q - I|, eigenvector misalignment 1 - |cos| over the columns with
eigenvalue >= 1e-2 and >= 1e-4 of the largest, and the residual ||F Q - Q diag(Q^T F Q)|| / ||F||.
tests/test_qr.py asserts the same comparisons.
"""

from __future__ import annotations

import argparse

import torch

from .. import linalg, qr
from .cli import at_least

F64 = torch.float64
METHODS = (
    ("float64 Householder", F64, "householder", False),
    ("float32 Householder", torch.float32, "householder", False),
    ("float32 CholeskyQR2", torch.float32, "cholesky_qr2", False),
    ("3xTF32 CholeskyQR2 (emulated)", torch.float32, "cholesky_qr2", True),
)


def problem(n: int, d: int, cond: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Factors, their float64 eigh basis (descending), eigenvalues, and a basis 1e-2 off it."""
    gen = torch.Generator().manual_seed(seed)
    vectors, _ = torch.linalg.qr(torch.randn(n, d, d, dtype=F64, generator=gen))
    lam = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=F64)
    factors = vectors @ torch.diag_embed(lam.expand(n, d)) @ vectors.mT
    near, _ = torch.linalg.qr(vectors + 1e-2 * torch.randn(n, d, d, dtype=F64, generator=gen))
    _, reference = torch.linalg.eigh(factors)
    return factors, reference.flip(-1), lam, near


def errors(q: torch.Tensor, reference: torch.Tensor, lam: torch.Tensor, factors: torch.Tensor) -> list[float]:
    d = q.shape[-1]
    out = [(q.mT @ q - torch.eye(d, dtype=F64)).abs().max().item()]
    cos = (q * reference).sum(-2).abs()
    for threshold in (1e-2, 1e-4):
        out.append((1 - cos[:, : int((lam >= threshold).sum())]).max().item())
    rayleigh = torch.einsum("nij,nik,nkj->nj", q, factors, q)
    residual = (factors @ q - q * rayleigh[:, None, :]).norm(dim=(-2, -1)) / factors.norm(dim=(-2, -1))
    out.append(residual.max().item())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m soap_dist.bench.qr_accuracy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", type=at_least(1), default=128, help="factor size d (default: %(default)s)")
    parser.add_argument(
        "--batch", type=at_least(1), default=2, help="factors per condition number (default: %(default)s)"
    )
    parser.add_argument(
        "--iterations",
        type=at_least(1),
        default=60,
        help="refreshes from the start basis (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    print(f"d = {args.size}, {args.batch} factors each, {args.iterations} refreshes from a basis 1e-2 off")
    columns = ("max abs(Q^T Q - I)", "1 - cos (lam >= 1e-2)", "1 - cos (lam >= 1e-4)", "residual")
    print("| condition | QR | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|")
    for cond in (1e6, 1e8, 1e10):
        factors, reference, lam, near = problem(args.batch, args.size, cond)
        for name, dtype, method, emulate in METHODS:
            previous, qr.EMULATE_TF32 = qr.EMULATE_TF32, emulate
            try:
                q = near.to(dtype)
                for _ in range(args.iterations):
                    q, _, ok = linalg.power_iteration_refresh(factors.to(dtype), q, method)
                failed = "" if bool(ok.all()) else " (a refresh failed)"
            finally:
                qr.EMULATE_TF32 = previous
            cells = " | ".join(f"{e:.1e}" for e in errors(q.double(), reference, lam, factors))
            print(f"| {cond:.0e} | {name}{failed} | {cells} |")


if __name__ == "__main__":
    main()
