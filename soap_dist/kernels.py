"""The SOAP step on a stack of equally shaped blocks, as pure functions on tensors.

A stack is ``x: [B, d_0, ..., d_{n-1}]``: B blocks processed together with batched matmuls. A
basis list holds, per block dim j, a ``[B, d_j, d_j]`` tensor or None (that dim is not
preconditioned). Nothing here knows about parameters, state dicts, ranks or torch.distributed.
"""

from __future__ import annotations

import functools

import torch

Tensor = torch.Tensor


def _contract(x: Tensor, dim: int, matrix: Tensor) -> Tensor:
    """y[..., c, ...] = sum_a x[..., a, ...] matrix[a, c] along block dim ``dim``, batched."""
    batch = x.shape[0]
    moved = x.movedim(dim + 1, -1)
    lead = moved.shape[1:-1]
    y = torch.bmm(moved.reshape(batch, -1, moved.shape[-1]), matrix)
    return y.view(batch, *lead, matrix.shape[-1]).movedim(-1, dim + 1)


def contract(x: Tensor, dim: int, matrix: Tensor) -> Tensor:
    """x contracted along block dim ``dim`` with ``matrix``'s rows (one matrix per block)."""
    if x.dim() == 3:
        return torch.bmm(matrix.mT, x) if dim == 0 else torch.bmm(x, matrix)
    return _contract(x, dim, matrix)


def rotate(x: Tensor, bases: list[Tensor | None]) -> Tensor:
    """P(x): into the eigenbasis (Q_L^T x Q_R for a matrix)."""
    if x.dim() == 3:
        left, right = bases
        if left is not None:
            x = torch.bmm(left.mT, x)
        return x if right is None else torch.bmm(x, right)
    for j, q in enumerate(bases):
        if q is not None:
            x = _contract(x, j, q)
    return x


def rotate_back(x: Tensor, bases: list[Tensor | None], scale: float = 1.0) -> Tensor:
    """scale * P^-1(x): out of the eigenbasis (Q_L x Q_R^T for a matrix).

    For a matrix the scale rides in the last GEMM's alpha, so it costs no extra pass.
    """
    if x.dim() == 3 and any(q is not None for q in bases):
        left, right = bases
        if right is None:
            return torch.baddbmm(torch.empty_like(x), left, x, beta=0.0, alpha=scale)
        if left is not None:
            x = torch.bmm(left, x)
        return torch.baddbmm(torch.empty_like(x), x, right.mT, beta=0.0, alpha=scale)
    for j, q in enumerate(bases):
        if q is not None:
            x = _contract(x, j, q.mT)
    return x * scale


def _unfold(x: Tensor, dim: int) -> Tensor:
    """Block dim ``dim`` as rows, every other block dim flattened into columns: ``[B, d_j, rest]``."""
    return x.movedim(dim + 1, 1).reshape(x.shape[0], x.shape[dim + 1], -1)


SYMMETRIC_SPLIT_MIN = 512  # a factor at least this large is accumulated as two row halves


def _gram_into_(out: Tensor, rows: Tensor, beta: float, alpha: float) -> Tensor:
    """out <- beta * out + alpha * rows rows^T in place, using the symmetry of the product.

    A factor of size d >= SYMMETRIC_SPLIT_MIN is cut into row halves: the two diagonal blocks and the
    upper off-diagonal block are GEMMs (3/4 of the full product's work), the lower block is the
    transposed copy of the upper one. beta = 0 ignores out's old contents, as baddbmm does.
    """
    d = rows.shape[1]
    if d < SYMMETRIC_SPLIT_MIN:
        return out.baddbmm_(rows, rows.mT, beta=beta, alpha=alpha)
    h = d // 2
    top, bottom = rows[:, :h], rows[:, h:]
    out[:, :h, :h].baddbmm_(top, top.mT, beta=beta, alpha=alpha)
    out[:, :h, h:].baddbmm_(top, bottom.mT, beta=beta, alpha=alpha)
    out[:, h:, h:].baddbmm_(bottom, bottom.mT, beta=beta, alpha=alpha)
    out[:, h:, :h].copy_(out[:, :h, h:].mT)
    return out


def statistic(x: Tensor, dim: int, scale: float = 1.0) -> Tensor:
    """scale * C_j(x): x contracted with itself over every block dim except ``dim``: ``[B, d_j, d_j]``.

    The scale rides in the GEMMs' alpha, so it costs no extra pass.
    """
    rows = _unfold(x, dim)
    out = torch.empty((rows.shape[0], rows.shape[1], rows.shape[1]), dtype=rows.dtype, device=rows.device)
    return _gram_into_(out, rows, beta=0.0, alpha=scale)


def adam_direction(
    grad_rotated: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight: Tensor,
) -> Tensor:
    """Update the moments in place and return m / (sqrt(v) + eps), all in the rotated basis.

    ``weight`` is 1 per block for a normal step and 0 for a block whose gradient was not finite:
    those blocks keep their moments exactly and get a zero direction.
    """
    shape = (-1,) + (1,) * (exp_avg.dim() - 1)
    w = weight.view(shape).to(exp_avg.dtype)
    exp_avg.lerp_(grad_rotated, w * (1.0 - beta1))
    exp_avg_sq.lerp_(grad_rotated.square(), w * (1.0 - beta2))
    direction = exp_avg_sq.sqrt().add_(eps)
    torch.div(exp_avg, direction, out=direction)
    return direction.mul_(w)


@functools.cache
def fused_adam_direction():
    """``adam_direction`` compiled into one elementwise kernel: ~17 passes over the block become 6.

    Shapes are dynamic, so every stack shares one graph per number of dims (no recompilation per
    shape); not fullgraph, so anything dynamo cannot compile runs eagerly instead of failing.
    """
    return torch.compile(adam_direction, dynamic=True)


def normalize_rms(update: Tensor) -> Tensor:
    """Divide each block by its RMS (+1e-30), the page's normalize_grads.

    Each block is scaled by its largest entry before squaring: in float32 the squares of an update
    near 1e-23 (what Adam's direction shrinks to after a long run of zero gradients) underflow to 0,
    and the division by 1e-30 then made a step of 1e7.
    """
    flat = update.flatten(1)
    peak = torch.linalg.vector_norm(flat, ord=float("inf"), dim=1, keepdim=True)
    scaled = torch.linalg.vector_norm(flat / peak.clamp_min(torch.finfo(flat.dtype).tiny), dim=1)
    rms = scaled.mul_(peak.squeeze(1)).div_(flat.shape[1] ** 0.5).add_(1e-30)
    return update.div_(rms.view((-1,) + (1,) * (update.dim() - 1)))


def permute_along(x: Tensor, dim: int, perm: Tensor) -> Tensor:
    """Re-index block dim ``dim`` of each block by its own permutation ``perm: [B, d]``."""
    shape = [1] * x.dim()
    shape[0], shape[dim + 1] = perm.shape
    # gather on an expanded (stride-0) index: take_along_dim would first wrap every index with a
    # remainder pass over the whole moment
    return x.gather(dim + 1, perm.view(shape).expand(x.shape))


def bias_corrected_step(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    """The page's step size: lr * sqrt(1 - beta2^t) / (1 - beta1^t), or lr without correction."""
    if not correct_bias:
        return lr
    return lr * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)


def accumulate_statistic(factors: Tensor, x: Tensor, dim: int, beta: float) -> Tensor:
    """factors <- beta * factors + (1 - beta) * C_j(x), in place, in batched GEMMs over the stack."""
    rows = _unfold(x, dim).to(factors.dtype)
    return _gram_into_(factors, rows, beta=beta, alpha=1.0 - beta)
