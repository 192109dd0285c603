"""Float64 test oracle for soap_dist, written from ../shared/SOAP_ALGORITHM.md (and the blocking rule
of ../shared/DESIGN.md).

It follows the algorithm page literally: one tensor at a time, one row block at a time, plain loops,
everything (factors, bases, eigh, QR, moments) in float64. It is slow on purpose; the fast
implementation is tested against it. It is not a pytest module.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor
F64 = torch.float64


def merged_shape(shape: list[int], max_precond_dim: int) -> list[int]:
    """Greedy merge of adjacent dims while their product stays <= max_precond_dim."""
    out: list[int] = []
    cur = 1
    for s in shape:
        if cur * s > max_precond_dim:
            if cur > 1:
                out.append(cur)
                cur = s
            else:
                out.append(s)
                cur = 1
        else:
            cur = cur * s
    if cur > 1 or len(out) == 0:
        out.append(cur)
    return out


def statistic(g: Tensor, j: int) -> Tensor:
    """C_j(G): contract G with itself over every dim except j (a d_j x d_j matrix)."""
    others = [i for i in range(g.dim()) if i != j]
    return torch.tensordot(g, g, dims=(others, others))


def rotate(x: Tensor, bases: list[Tensor | None]) -> Tensor:
    """P(x): contract dim j of x with Q_j (Q_L^T x Q_R for a matrix); dims without a basis stay."""
    for j, q in enumerate(bases):
        if q is not None:
            x = (x.movedim(j, -1) @ q).movedim(-1, j)
    return x


def rotate_back(x: Tensor, bases: list[Tensor | None]) -> Tensor:
    """P^-1(x): contract dim j of x with Q_j^T (Q_L x Q_R^T for a matrix)."""
    for j, q in enumerate(bases):
        if q is not None:
            x = (x.movedim(j, -1) @ q.T).movedim(-1, j)
    return x


def eigenbasis_descending(f: Tensor) -> Tensor:
    """Eigenvectors of f + 1e-30 I, columns ordered by descending eigenvalue."""
    eye = torch.eye(f.shape[0], dtype=F64)
    _, q = torch.linalg.eigh(f + 1e-30 * eye)  # ascending eigenvalues
    return torch.flip(q, dims=[1])


def refresh(f: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """One refresh of a basis: sort by estimated eigenvalues, one power iteration, QR.

    Returns (new basis, sort permutation pi).
    """
    lam = torch.diag(q.T @ f @ q)
    pi = torch.argsort(lam, descending=True)
    q_new, _ = torch.linalg.qr(f @ q[:, pi])
    return q_new, pi


class OracleSOAP:
    """Float64 reference SOAP, one instance per parameter group."""

    def __init__(
        self,
        params: list[Tensor],
        *,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
        block_size: int | None = None,
        phases: list[int] | None = None,
    ) -> None:
        self.params: list[Tensor] = [p.detach().clone().to(F64) for p in params]
        self.phases = phases if phases is not None else [0] * len(self.params)  # refresh at t % k == phase
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.beta_s = shampoo_beta if shampoo_beta >= 0 else self.beta2
        self.eps = eps
        self.weight_decay = weight_decay
        self.k = precondition_frequency
        self.max_precond_dim = max_precond_dim
        self.merge_dims = merge_dims
        self.precondition_1d = precondition_1d
        self.normalize_grads = normalize_grads
        self.data_format = data_format
        self.correct_bias = correct_bias
        self.block_size = block_size
        self.state: list[dict] = [{} for _ in self.params]

    # ----- shape rules -----
    def _permutes(self, p: Tensor) -> bool:
        return self.merge_dims and p.dim() == 4 and self.data_format == "channels_last"

    def _to_work(self, x: Tensor, st: dict) -> Tensor:
        """Parameter shape -> working shape (optional channels_last permute, then merge)."""
        if st["permuted"]:
            x = x.permute(0, 3, 1, 2)
        return x.reshape(st["work_shape"])

    def _from_work(self, x: Tensor, p: Tensor, st: dict) -> Tensor:
        """Working shape -> parameter shape."""
        if st["permuted"]:
            n, h, w, c = p.shape
            return x.reshape(n, c, h, w).permute(0, 2, 3, 1)
        return x.reshape(p.shape)

    def _init_state(self, p: Tensor) -> dict:
        st: dict = {"t": 0, "started": False, "permuted": self._permutes(p)}
        shape = list(p.permute(0, 3, 1, 2).shape) if st["permuted"] else list(p.shape)
        if p.dim() == 0:
            shape = [1]
        if self.merge_dims and p.dim() > 1:
            shape = merged_shape(shape, self.max_precond_dim)
        st["work_shape"] = shape
        if p.dim() <= 1:  # 1-D rule, decided on the original tensor
            has = [self.precondition_1d and p.dim() == 1 and shape[0] <= self.max_precond_dim]
        else:
            has = [d <= self.max_precond_dim for d in shape]
        st["has_factor"] = has
        # Factors and bases of dims 1.. are shared by all row blocks (None = identity).
        st["factors"] = [None] * len(shape)
        st["bases"] = [None] * len(shape)
        d0 = shape[0]
        b = d0 if self.block_size is None else self.block_size
        st["blocks"] = []
        for start in range(0, d0, b):
            stop = min(start + b, d0)
            rest = shape[1:]
            st["blocks"].append(
                {
                    "start": start,
                    "stop": stop,
                    "factor0": None,
                    "basis0": None,
                    "m": torch.zeros([stop - start, *rest], dtype=F64),
                    "v": torch.zeros([stop - start, *rest], dtype=F64),
                }
            )
        return st

    @staticmethod
    def _block_bases(st: dict, blk: dict) -> list[Tensor | None]:
        return [blk["basis0"], *st["bases"][1:]]

    # ----- factor statistics -----
    def _accumulate(self, st: dict, g: Tensor, first: bool) -> None:
        """factor <- beta_s * factor + (1 - beta_s) * C_j(G); on the first call factor = (1-beta_s) C_j(G)."""
        a = 1.0 - self.beta_s
        for blk in st["blocks"]:
            if st["has_factor"][0]:
                c = statistic(g[blk["start"] : blk["stop"]], 0)
                blk["factor0"] = a * c if first else self.beta_s * blk["factor0"] + a * c
        for j in range(1, len(st["work_shape"])):
            if st["has_factor"][j]:
                c = statistic(g, j)  # the whole tensor = the sum over row blocks
                st["factors"][j] = a * c if first else self.beta_s * st["factors"][j] + a * c

    def _refresh_all(self, st: dict) -> None:
        """Refresh every basis; re-index v by each sort permutation; carry m to the new bases."""
        blocks = st["blocks"]
        m_plain = [rotate_back(blk["m"], self._block_bases(st, blk)) for blk in blocks]
        for blk in blocks:
            if blk["basis0"] is not None:
                blk["basis0"], pi = refresh(blk["factor0"], blk["basis0"])
                blk["v"] = blk["v"].index_select(0, pi)
        for j in range(1, len(st["work_shape"])):
            if st["bases"][j] is not None:
                st["bases"][j], pi = refresh(st["factors"][j], st["bases"][j])
                for blk in blocks:
                    blk["v"] = blk["v"].index_select(j, pi)
        for blk, m in zip(blocks, m_plain, strict=True):
            blk["m"] = rotate(m, self._block_bases(st, blk))

    # ----- the step -----
    @torch.no_grad()
    def step(self, grads: list[Tensor | None]) -> None:
        """One optimizer call for every tensor (a None gradient skips that tensor)."""
        for i, (p, grad) in enumerate(zip(self.params, grads, strict=True)):
            if grad is None:
                continue
            if not self.state[i]:
                self.state[i] = self._init_state(p)
                self.state[i]["phase"] = self.phases[i]
            st = self.state[i]
            g = self._to_work(grad.detach().to(F64), st)
            if not st["started"]:
                self._first_call(st, g)
            else:
                self._update(p, st, g)

    def _first_call(self, st: dict, g: Tensor) -> None:
        st["started"] = True
        self._accumulate(st, g, first=True)
        for blk in st["blocks"]:
            if st["has_factor"][0]:
                blk["basis0"] = eigenbasis_descending(blk["factor0"])
        for j in range(1, len(st["work_shape"])):
            if st["has_factor"][j]:
                st["bases"][j] = eigenbasis_descending(st["factors"][j])

    def _update(self, p: Tensor, st: dict, g: Tensor) -> None:
        st["t"] += 1
        t = st["t"]
        b1, b2 = self.beta1, self.beta2
        u_blocks = []
        for blk in st["blocks"]:
            bases = self._block_bases(st, blk)
            g_rot = rotate(g[blk["start"] : blk["stop"]], bases)
            blk["m"] = b1 * blk["m"] + (1.0 - b1) * g_rot
            blk["v"] = b2 * blk["v"] + (1.0 - b2) * g_rot * g_rot
            u_blk = rotate_back(blk["m"] / (torch.sqrt(blk["v"]) + self.eps), bases)
            if self.normalize_grads:  # per row block (soap_dist's documented rule; the page when uncut)
                u_blk = u_blk / (1e-30 + torch.sqrt(torch.mean(u_blk * u_blk)))
            u_blocks.append(u_blk)
        u = torch.cat(u_blocks, dim=0)
        if self.correct_bias:
            step_size = self.lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        else:
            step_size = self.lr
        p.sub_(step_size * self._from_work(u, p, st))
        if self.weight_decay > 0:
            p.sub_(self.lr * self.weight_decay * p)
        self._accumulate(st, g, first=False)
        if t % self.k == st["phase"] % self.k:
            self._refresh_all(st)


def _self_check() -> None:
    """Sanity checks of the oracle itself (run: python tests/oracle.py)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (6,), (2, 3, 4)]
    # 1. No factors (max_precond_dim=0), no decay, tiny eps: exactly AdamW after the skipped first call.
    w0 = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    gs = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(21)]
    orc = OracleSOAP(w0, lr=1e-2, betas=(0.9, 0.99), eps=1e-30, weight_decay=0.0, max_precond_dim=0)
    ref = [w.clone().requires_grad_(True) for w in w0]
    adam = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-30, weight_decay=0.0)
    orc.step(gs[0])
    assert all(torch.equal(a, b) for a, b in zip(orc.params, w0, strict=True)), "first call must not update"
    for n in range(1, 21):
        orc.step(gs[n])
        for r, g in zip(ref, gs[n], strict=True):
            r.grad = g.clone()
        adam.step()
    for a, b in zip(orc.params, ref, strict=True):
        err = ((a - b.detach()).norm() / b.detach().norm()).item()
        assert err < 1e-12, f"AdamW mismatch {err}"

    # 2. merge_dims on a 4-D conv kernel, both data formats; block_size None == block_size >= d0.
    def run(fmt: str, block: int | None, shape: tuple[int, ...] = (4, 3, 5, 6)) -> Tensor:
        # merged working shapes: channels_first [12, 5, 6], channels_last [4, 18, 5]
        g2 = torch.Generator().manual_seed(1)
        w = torch.randn(shape, generator=g2, dtype=F64)
        o = OracleSOAP(
            [w],
            merge_dims=True,
            max_precond_dim=20,
            data_format=fmt,
            block_size=block,
            precondition_frequency=3,
            normalize_grads=True,
        )
        for _ in range(12):
            o.step([torch.randn(shape, generator=g2, dtype=F64)])
        assert o.params[0].shape == w.shape and torch.isfinite(o.params[0]).all()
        return o.params[0]

    for fmt, d0 in (("channels_first", 12), ("channels_last", 4)):
        base = run(fmt, None)
        assert torch.equal(base, run(fmt, d0)) and torch.equal(base, run(fmt, 100))
        assert not torch.allclose(base, run(fmt, 3), rtol=1e-6, atol=0)  # a real cut changes the result
    assert not torch.allclose(run("channels_first", None), run("channels_last", None), rtol=1e-6, atol=0)
    print("oracle self-check passed")


if __name__ == "__main__":
    _self_check()
