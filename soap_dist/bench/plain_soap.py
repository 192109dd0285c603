"""A plain per-tensor SOAP: the reference's structure, written from the algorithm page.

It is the baseline soap_dist must beat: one tensor at a time, every matrix paying 10 large matmuls per
step (project the gradient: 2; project the update back: 2; factor update G G^T, G^T G: 2; rotate the first
moment out of the basis before the factor update and back into the (possibly new) basis after it: 4).
That last pair is an identity between refreshes (up to rounding), which is why the page allows a lean
implementation to skip it; keeping it here is the point. Factors, bases and moments are float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Compute float32 matmuls without TF32 inside (the page asks this of the eigenvalue estimate)."""
    old = torch.get_float32_matmul_precision()
    if old != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if old != "highest":
            torch.set_float32_matmul_precision(old)


def rotate(x: Tensor, bases: list[Tensor | None], back: bool = False) -> Tensor:
    """Contract each dim j of x with Q_j (or Q_j^T when back); a dim without a factor is only cycled.

    Contracting dim 0 moves it to the end, so after one pass over all dims they are back in order; for a
    matrix this is Q_L^T X Q_R (forward) or Q_L X Q_R^T (back), one matmul per factor.
    """
    for q in bases:
        if q is None:
            x = x.movedim(0, -1)
        else:
            x = torch.tensordot(x, q, dims=([0], [1 if back else 0]))
    return x


def contract(g: Tensor, j: int) -> Tensor:
    """C_j(G): G contracted with itself over every dim except j (G G^T and G^T G for a matrix)."""
    others = [i for i in range(g.ndim) if i != j]
    return torch.tensordot(g, g, dims=(others, others))


def eigh_descending(f: Tensor) -> Tensor:
    """Eigenvectors of f + 1e-30 I, columns by descending eigenvalue; retried in float64 if it fails."""
    a = f + 1e-30 * torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
    try:
        _, q = torch.linalg.eigh(a)
    except RuntimeError:
        _, q = torch.linalg.eigh(a.double())
        q = q.to(f.dtype)
    return q.flip(-1)


class PlainSOAP(torch.optim.Optimizer):
    """SOAP as the page states it, one tensor at a time (no batching, no merge_dims, no normalize_grads)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        precondition_1d: bool = False,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            precondition_1d=precondition_1d,
        )
        super().__init__(params, defaults)
        self.state_dtype = state_dtype  # float64 only for checking the math against a float64 oracle

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_tensor(p, group)
        return loss

    def _step_tensor(self, p: Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        beta_s = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        g = p.grad.to(self.state_dtype)
        state = self.state[p]
        if not state:  # first call: factors and their eigenbases only, no update
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
            use = [s <= group["max_precond_dim"] for s in g.shape]
            if g.ndim == 1 and not group["precondition_1d"]:
                use = [False]
            state["factors"] = [contract(g, j).mul_(1 - beta_s) if u else None for j, u in enumerate(use)]
            state["bases"] = [eigh_descending(f) if f is not None else None for f in state["factors"]]
            return

        factors, bases = state["factors"], state["bases"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g_rot = rotate(g, bases)  # 2 matmuls
        state["step"] += 1
        t = state["step"]
        m.mul_(beta1).add_(g_rot, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
        update = rotate(m / (v.sqrt() + group["eps"]), bases, back=True)  # 2 matmuls
        step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p.add_(update.to(p.dtype), alpha=-step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

        m_orig = rotate(m, bases, back=True)  # 2 matmuls: the moment leaves the basis ...
        for j, f in enumerate(factors):
            if f is not None:
                f.mul_(beta_s).add_(contract(g, j), alpha=1 - beta_s)  # 2 matmuls for a matrix
        if t % group["precondition_frequency"] == 0:
            self._refresh(state)
        state["exp_avg"] = rotate(m_orig, state["bases"])  # ... and comes back: 2 matmuls

    @staticmethod
    def _refresh(state: dict) -> None:
        """One power-iteration step + QR per factor, keeping columns sorted by estimated eigenvalue."""
        for j, (f, q) in enumerate(zip(state["factors"], state["bases"], strict=True)):
            if f is None:
                continue
            with full_fp32_matmul():
                est = torch.diagonal(q.T @ f @ q)
            perm = torch.argsort(est, descending=True)
            state["exp_avg_sq"] = state["exp_avg_sq"].index_select(j, perm)
            state["bases"][j] = torch.linalg.qr(f @ q[:, perm]).Q
