"""The floor: the work a SOAP step cannot avoid, done as cheaply as torch allows.

Per 2-D block with both factors that is six matmuls (Q_L^T G, (.) Q_R, Q_L X, (.) Q_R^T, G G^T, G^T G);
with one factor (the embedding under max_precond_dim) three. Blocks of equal shape are stacked and run as
one batched matmul into preallocated outputs, at the process's float32 matmul precision (TF32 or not),
followed by one AdamW pass over all parameters (fused on GPU, foreach on CPU) for the elementwise work.
Eigenvector refreshes are not part of the floor: it is the per-step cost only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from soap_dist.bench.param_sets import ParamSpec, factor_dims


def _orthonormal(b: int, n: int, device: torch.device, gen: torch.Generator) -> Tensor:
    """A stack of random orthonormal n x n matrices (the values do not matter, the shapes and layout do)."""
    a = torch.randn(b, n, n, device=device, generator=gen)
    return torch.linalg.qr(a).Q.contiguous()


class _Block:
    """All 2-D blocks of one shape, stacked as [B, m, n], with their bases and output buffers."""

    def __init__(
        self, shape: tuple[int, int], count: int, use: list[bool], device: torch.device, gen: torch.Generator
    ) -> None:
        m, n = shape
        self.g = torch.randn(count, m, n, device=device, generator=gen)
        self.ql = _orthonormal(count, m, device, gen) if use[0] else None
        self.qr = _orthonormal(count, n, device, gen) if use[1] else None
        self.rot = torch.empty_like(self.g)
        self.tmp = torch.empty_like(self.g)
        self.upd = torch.empty_like(self.g)
        self.left = torch.empty(count, m, m, device=device) if use[0] else None
        self.right = torch.empty(count, n, n, device=device) if use[1] else None

    @property
    def matmuls(self) -> int:
        return 3 * ((self.ql is not None) + (self.qr is not None))

    def run(self) -> None:
        g, ql, qr = self.g, self.ql, self.qr
        if ql is not None and qr is not None:
            torch.bmm(ql.mT, g, out=self.tmp)
            torch.bmm(self.tmp, qr, out=self.rot)  # G' = Q_L^T G Q_R
            torch.bmm(ql, self.rot, out=self.tmp)
            torch.bmm(self.tmp, qr.mT, out=self.upd)  # U = Q_L X Q_R^T (X stands in for the Adam ratio)
        elif qr is not None:
            torch.bmm(g, qr, out=self.rot)
            torch.bmm(self.rot, qr.mT, out=self.upd)
        elif ql is not None:
            torch.bmm(ql.mT, g, out=self.rot)
            torch.bmm(ql, self.rot, out=self.upd)
        if self.left is not None:
            torch.bmm(g, g.mT, out=self.left)
        if self.right is not None:
            torch.bmm(g.mT, g, out=self.right)


class Floor:
    """Times like an optimizer: ``step()`` runs every shape's batched matmuls, then one AdamW step."""

    def __init__(
        self,
        params: Sequence[Tensor],
        specs: Sequence[ParamSpec],
        max_precond_dim: int = 10000,
        seed: int = 0,
        **adamw_kwargs: float | tuple[float, float],
    ) -> None:
        device = params[0].device
        gen = torch.Generator(device=device).manual_seed(seed)
        shapes = Counter(s.shape for s in specs if len(s.shape) == 2)
        self.blocks: list[_Block] = []
        for shape, count in sorted(shapes.items()):
            use = factor_dims(shape, max_precond_dim)
            if any(use):
                self.blocks.append(_Block(shape, count, use, device, gen))  # type: ignore[arg-type]
        cuda = device.type == "cuda"
        self.adamw = torch.optim.AdamW(params, fused=cuda, foreach=not cuda, **adamw_kwargs)

    @property
    def matmuls_per_step(self) -> int:
        """Large matmuls per step, counted per 2-D block (a batched matmul over B blocks counts B)."""
        return sum(b.matmuls * b.g.shape[0] for b in self.blocks)

    @torch.no_grad()
    def step(self) -> None:
        for block in self.blocks:
            block.run()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
