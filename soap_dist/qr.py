"""Q factors of batches of square matrices, with every O(d^3) piece a batched matmul.

The refresh's QR (``orthonormalize_``) is CholeskyQR2 on the column-normalised power iterate:
Gram matrix, Cholesky, then Q = X L^-T, twice. cuSOLVER's triangular solve on a 4096 x 4096 matrix
runs as many small kernels off the tensor cores; here X L^-T is one GEMM with L^-1 formed by a
recursive block inverse (``lower_inverse``: d^3/3 flops, all but the small leaves GEMMs). On CUDA
the products run in "3xTF32" (``accurate_matmul``): float32 accuracy at tensor-core speed. The
Cholesky itself (d^3/3, a sixth of the flops) is cuSOLVER's, unless the factor is at least
``BLOCKED_CHOLESKY_FROM``: then ``inverse_cholesky`` gives L^-1 directly, by halves, with every
product above its small leaves a 3xTF32 GEMM (off by default until a GPU has timed both:
``python -m soap_dist.bench.refresh_parts``, the GPU suite's part r).

``EMULATE_TF32`` makes CPU float32 take the CUDA arithmetic, with every product's inputs rounded
to TF32 as tensor cores do, so the accuracy of that path is tested without a GPU.
Nothing here knows about parameters, ranks or torch.distributed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

Tensor = torch.Tensor

EMULATE_TF32 = False  # tests: run the tensor-core arithmetic on CPU float32
INVERSE_LEAF = 64  # diagonal blocks this small are inverted by a batched triangular solve
CLOSE_TO_ORTHONORMAL = 0.5  # a second Gram matrix further than this from I means the first pass failed
BLOCKED_CHOLESKY_FROM: int | None = None  # on the fast path, factors this large use inverse_cholesky
CHOLESKY_LEAF = 128  # inverse_cholesky's diagonal blocks this small go to cholesky_ex (batched)


def split_tf32(x: Tensor) -> tuple[Tensor, Tensor]:
    """x = hi + lo with hi exactly representable in TF32 (10 mantissa bits) and lo the exact rest."""
    hi = (x.view(torch.int32) & -8192).view(torch.float32)  # clear the 13 low mantissa bits
    return hi, x - hi


def round_tf32(x: Tensor) -> Tensor:
    """x rounded to the nearest TF32 value: what a tensor core reads of a float32 input."""
    return ((x.view(torch.int32) + 4096) & -8192).view(torch.float32)


def fast_path(x: Tensor) -> bool:
    """Products on tensor cores (3xTF32): CUDA float32 batches, or CPU under ``EMULATE_TF32``."""
    return x.dtype == torch.float32 and x.dim() == 3 and (x.device.type == "cuda" or EMULATE_TF32)


@contextmanager
def tf32_matmuls() -> Iterator[None]:
    """CUDA float32 matmuls on tensor cores (TF32) inside, whatever the caller's setting, which is
    left as it was.

    torch >= 2.9 has two ways to choose: the legacy ``allow_tf32`` flag (and
    ``set_float32_matmul_precision``) and the ``fp32_precision`` settings. Mixing them makes the
    legacy reads raise ("mix of the legacy and new APIs"), torch.compile's cache keys among them in
    some versions. So this writes through the API the caller used: the legacy flag where its read
    works (it ran on the H100 image with the compiled step, docs/benchmarks.md), else
    ``fp32_precision``.
    """
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision  # "tf32" or "ieee" (read through to the generic setting), or "none"
    try:
        legacy_on: bool | None = matmul.allow_tf32
    except RuntimeError:  # the caller chose through fp32_precision: legacy reads are refused
        legacy_on = None
    if before == "tf32" or legacy_on:  # on already: a write could only mix the two APIs
        yield
        return
    own = _matmul_own_precision()  # what to put back: "none" keeps following the generic setting
    if legacy_on is None:
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = own
        return
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = False
        if own == "none":  # the legacy write leaves "ieee" of its own, which would hide a later
            matmul.fp32_precision = "none"  # torch.backends.fp32_precision from the caller's matmuls


def _matmul_own_precision() -> str:
    """CUDA matmuls' own fp32_precision ("none": they follow torch.backends.fp32_precision). Their
    getter reads through to the generic setting, so that is set to "none" for the read."""
    generic = torch.backends.fp32_precision
    if generic == "none":
        return torch.backends.cuda.matmul.fp32_precision
    torch.backends.fp32_precision = "none"
    try:
        return torch.backends.cuda.matmul.fp32_precision
    finally:
        torch.backends.fp32_precision = generic


def _tf32_bmm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b (+ out) with TF32 inputs and float32 accumulation."""
    if a.device.type != "cuda":  # the emulation: exact products of the rounded inputs, float32 sums
        product = torch.bmm(round_tf32(a.contiguous()), round_tf32(b.contiguous()))
        return product if out is None else out.add_(product)
    with tf32_matmuls():
        return torch.bmm(a, b) if out is None else out.baddbmm_(a, b)


def accurate_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b to about float32 accuracy, fast on CUDA: three TF32 products (the "3xTF32" split).

    hi_a hi_b is exact in TF32; the two cross terms carry the low bits; lo_a lo_b (~2^-22 relative)
    is dropped. On tensor cores this is faster than an IEEE float32 GEMM. Elsewhere, and for
    float64, it is a plain matmul.
    """
    if not fast_path(a):
        return a @ b
    a_hi, a_lo = split_tf32(a)
    b_hi, b_lo = split_tf32(b)
    out = _tf32_bmm(a_lo, b_hi)
    _tf32_bmm(a_hi, b_lo, out)
    return _tf32_bmm(a_hi, b_hi, out)


def accurate_gram(x: Tensor) -> Tensor:
    """x^T x to float32 accuracy: hi^T hi + C + C^T with C = hi^T lo, two TF32 products, not three."""
    if not fast_path(x):
        return x.mT @ x
    hi, lo = split_tf32(x)
    cross = _tf32_bmm(hi.mT, lo)
    return _tf32_bmm(hi.mT, hi, cross + cross.mT)


def lower_inverse(lower: Tensor) -> Tensor:
    """L^-1 of a batch of lower-triangular matrices, by halves: [[A, 0], [B, C]]^-1 =
    [[A^-1, 0], [-C^-1 B A^-1, C^-1]]. All the work above the leaves is accurate_matmul.

    When d = leaf * 2^levels with a leaf of at most ``MAX_LEAF`` (every width of the usual models),
    it runs bottom-up, one level at a time: all the leaves in one batched triangular solve, then each
    level's blocks in one pair of batched products: some 20 kernels per level, whatever the number
    of blocks (5 levels for 4096). A GPU refresh is bound by kernel launches, not flops, at these
    sizes (docs/benchmarks.md). Other sizes recurse by halves.
    """
    levels = _levels(lower.shape[-1])
    if levels is None:
        return _lower_inverse_by_halves(lower)
    lower = lower.contiguous()
    n, d = lower.shape[0], lower.shape[-1]
    leaf = d >> levels
    out = torch.zeros_like(lower)
    eye = torch.eye(leaf, dtype=lower.dtype, device=lower.device)
    leaves = _diagonal_blocks(lower, leaf).reshape(-1, leaf, leaf)
    _diagonal_blocks(out, leaf).copy_(
        torch.linalg.solve_triangular(leaves, eye.expand_as(leaves), upper=False).view(n, -1, leaf, leaf)
    )
    half = leaf
    while half < d:
        inv, low = _diagonal_blocks(out, 2 * half), _diagonal_blocks(lower, 2 * half)
        first = inv[..., :half, :half].reshape(-1, half, half)
        last = inv[..., half:, half:].reshape(-1, half, half)
        below = low[..., half:, :half].reshape(-1, half, half)
        inv[..., half:, :half] = (
            accurate_matmul(last, accurate_matmul(below, first)).neg_().view_as(inv[..., half:, :half])
        )
        half *= 2
    return out


MIN_LEAF, MAX_LEAF = 32, 128


def _levels(d: int) -> int | None:
    """How many times d halves down to a leaf in [MIN_LEAF, MAX_LEAF]; None when it does not."""
    levels = 0
    while d % 2 == 0 and d // 2 >= MIN_LEAF and d > MAX_LEAF:
        d //= 2
        levels += 1
    return levels if d <= MAX_LEAF else None


def _diagonal_blocks(t: Tensor, size: int) -> Tensor:
    """The d/size diagonal blocks of each contiguous [N, d, d] matrix, as a view [N, d/size, size, size]."""
    n, d = t.shape[0], t.shape[-1]
    return t.as_strided((n, d // size, size, size), (d * d, size * (d + 1), d, 1), t.storage_offset())


def _lower_inverse_by_halves(lower: Tensor) -> Tensor:
    """lower_inverse for any d, recursing on halves (a kernel sequence per block, not per level)."""
    d = lower.shape[-1]
    if d <= INVERSE_LEAF:
        eye = torch.eye(d, dtype=lower.dtype, device=lower.device).expand_as(lower)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    half = max(INVERSE_LEAF, (d // 2) // INVERSE_LEAF * INVERSE_LEAF)  # aligned halves tile GEMMs well
    first = _lower_inverse_by_halves(lower[:, :half, :half])
    last = _lower_inverse_by_halves(lower[:, half:, half:])
    out = torch.zeros_like(lower)
    out[:, :half, :half] = first
    out[:, half:, half:] = last
    out[:, half:, :half] = accurate_matmul(last, accurate_matmul(lower[:, half:, :half], first)).neg_()
    return out


def inverse_cholesky(a: Tensor) -> tuple[Tensor, Tensor]:
    """L^-1 for L L^T = a (a batch of symmetric positive definite matrices), and an ok flag per
    matrix (False: a leaf's Cholesky broke down; the inverse is then not to be used).

    By halves: L11 = chol(A11), L21 = A21 L11^-T, L22 = chol(A22 - L21 L21^T), and
    L^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]. Above the leaves every product is
    accurate_matmul (about 2 d^3 TF32 flops in all), where cuSOLVER's Cholesky runs off the tensor
    cores and ``lower_inverse`` then adds d^3 of its own. L itself is never assembled: CholeskyQR
    needs only L^-1.
    """
    d = a.shape[-1]
    if d <= CHOLESKY_LEAF:
        lower, info = torch.linalg.cholesky_ex(a)
        return lower_inverse(lower), info == 0
    half = (d // 2) // 32 * 32 or d // 2  # aligned halves tile GEMMs well
    first, ok_first = inverse_cholesky(a[:, :half, :half])
    below = accurate_matmul(a[:, half:, :half], first.mT)  # L21
    last, ok_last = inverse_cholesky(a[:, half:, half:] - accurate_matmul(below, below.mT))
    out = torch.zeros_like(a)
    out[:, :half, :half] = first
    out[:, half:, half:] = last
    out[:, half:, :half] = accurate_matmul(last, accurate_matmul(below, first)).neg_()
    return out, ok_first & ok_last


def _blocked_cholesky(x: Tensor) -> bool:
    return fast_path(x) and BLOCKED_CHOLESKY_FROM is not None and x.shape[-1] >= BLOCKED_CHOLESKY_FROM


def cholesky_qr(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One CholeskyQR pass: Q = X L^-T with L L^T = X^T X. Returns Q, ok, and the Gram matrix."""
    gram = accurate_gram(x)
    if _blocked_cholesky(x):
        inverse, ok = inverse_cholesky(gram)
    else:
        lower, info = torch.linalg.cholesky_ex(gram)
        inverse, ok = lower_inverse(lower), info == 0
    q = accurate_matmul(x, inverse.mT)
    return q, ok, gram


def all_finite(x: Tensor) -> Tensor:
    """One flag per matrix of the batch: no NaN or Inf in it."""
    return torch.isfinite(x).flatten(1).all(1)


def orthonormalize_(x: Tensor, method: str = "cholesky_qr2", fallback: bool = True) -> tuple[Tensor, Tensor]:
    """Q of the QR decomposition of each ``x`` in the batch, with R's diagonal made positive.

    Non-finite matrices in ``x`` are zeroed in place (and reported not ok).
    ``cholesky_qr2`` runs two CholeskyQR passes on the column-normalized matrix (QR(X D) has the
    same Q as QR(X) for a positive diagonal D, and the power iterate is ill-conditioned mostly by
    column scale). A matrix whose first pass is not accurate enough (Cholesky breakdown, or a second
    Gram matrix far from I) is redone with Householder QR (LAPACK/cuSOLVER geqrf), so the result is
    the QR factor either way. A Householder QR that raises reports its matrices not ok (the old
    bases stay), never escapes.

    ``fallback=False`` never reads a result on the host (no synchronisation, for a refresh running
    on its own CUDA stream): a finite matrix that would need the Householder redo (or a float64
    retry) comes back not ok holding ``x`` itself, for the caller to redo later with
    ``orthonormalize_(x, "householder")``; a non-finite one comes back not ok and all NaN.
    """
    if method not in ("cholesky_qr2", "householder"):
        raise ValueError(f"qr_method must be 'cholesky_qr2' or 'householder', got {method!r}")
    finite = all_finite(x)
    x.masked_fill_(~finite[:, None, None], 0.0)
    if method == "householder":
        q, q_finite = safe_householder(x)
        if not fallback:
            return _for_a_later_redo(x, q, finite, q_finite)
    else:
        norms = torch.linalg.vector_norm(x, dim=-2, keepdim=True)
        # x itself is kept for the Householder fallback: on a rank-deficient x, QR(x) and QR(x D)
        # differ in the arbitrary null-space columns, and the fallback must give QR(x) as the page does.
        first, ok_first, gram = cholesky_qr(x / norms.masked_fill_(norms == 0, 1.0))
        del gram
        q, ok_second, gram = cholesky_qr(first)
        del first
        torch.diagonal(gram, dim1=-2, dim2=-1).sub_(1.0)
        close = gram.abs_().flatten(1).amax(1) < CLOSE_TO_ORTHONORMAL
        del gram
        q_finite = all_finite(q) & ok_first & ok_second & close
        if not fallback:
            return _for_a_later_redo(x, q, finite, q_finite)
        bad = (finite & ~q_finite).nonzero().flatten()
        if bad.numel():  # a host sync, but only in the refresh
            q[bad], q_finite[bad] = safe_householder(x[bad])
    retry = (finite & ~q_finite).nonzero().flatten()
    if retry.numel():  # a finite input whose QR failed or came out non-finite: once more in float64
        redone, good = safe_householder(x[retry].double())
        q[retry] = redone.to(q.dtype)
        q_finite[retry] = good & all_finite(q[retry])
    return q, finite & q_finite


def _for_a_later_redo(x: Tensor, q: Tensor, finite: Tensor, good: Tensor) -> tuple[Tensor, Tensor]:
    """orthonormalize_'s fallback=False result: Q where good, x where finite but not good, else NaN."""
    q = torch.where((finite & ~good)[:, None, None], x, q)
    return q.masked_fill_(~finite[:, None, None], float("nan")), finite & good


def householder(x: Tensor) -> Tensor:
    """Householder QR's Q with R's diagonal made positive.

    geqrf + householder_product rather than linalg.qr: R's diagonal is read off geqrf's output, so
    R is never copied out of it (linalg.qr's triu pass).
    """
    reflectors, tau = torch.geqrf(x)
    signs = torch.sign(torch.diagonal(reflectors, dim1=-2, dim2=-1))
    signs.masked_fill_(signs == 0, 1.0)
    return torch.linalg.householder_product(reflectors, tau).mul_(signs[..., None, :])


def safe_householder(x: Tensor) -> tuple[Tensor, Tensor]:
    """householder and a finite flag per matrix; a LAPACK/cuSOLVER error flags matrices, never escapes.

    A batch that raises is redone one matrix at a time, so only the matrices that fail get
    ``ok = False`` (with an identity Q the caller must not install), as eigh_descending does.
    """
    try:
        q = householder(x)
        return q, all_finite(q)
    except RuntimeError:
        pass
    eye = torch.eye(x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)
    q = eye.expand_as(x).clone()
    ok = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for i in range(x.shape[0]):
        try:
            q[i] = householder(x[i : i + 1])[0]
        except RuntimeError:
            continue
        ok[i] = all_finite(q[i : i + 1])[0]
    return q, ok
