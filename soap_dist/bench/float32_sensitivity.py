"""``python -m soap_dist.bench.float32_sensitivity``: how far float32 SOAP moves from one rounding.

SOAP amplifies rounding through the eigenvalue order of its bases, so two float32 runs that sum the
same numbers in another order (a reduce across ranks, another GEMM blocking) end apart. This runs
the scaling bench's set, parameters, gradients and options in one process twice, the second with
every first gradient scaled by 1 + 1e-7 (one float32 rounding), and prints max |A - B| / max |A|
over the parameters and per parameter: the yardstick for the bench's "parameters vs world 1".
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from .cli import at_least
from .param_sets import MODELS
from .scaling_worker import HYPER, _global_params, _grads_at, scaled_specs


def run(specs: Sequence, steps: int, k: int, perturb: bool) -> list[torch.Tensor]:
    from soap_dist import SOAP

    device = torch.device("cpu")
    params = [torch.nn.Parameter(p) for p in _global_params(specs, device, 0)]
    opt = SOAP(
        params, precondition_frequency=k, max_precond_dim=10000, placement="single", fused=False, **HYPER
    )
    for t in range(steps + 1):  # the first call plus ``steps`` steps, as the bench
        for p, g in zip(params, _grads_at(specs, device, 0, t), strict=True):
            p.grad = g * (1 + 1e-7) if perturb and t == 0 else g
        opt.step()
    return [p.detach().clone() for p in params]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m soap_dist.bench.float32_sensitivity", description=__doc__)
    p.add_argument(
        "--model", choices=sorted(MODELS), default="gpt2-small", help="parameter set (default: %(default)s)"
    )
    p.add_argument("--layers", type=at_least(1), default=1, help="transformer layers (default: %(default)s)")
    p.add_argument("--width", type=at_least(0), default=0, help="d_model (0 = the model's own), as the bench")
    p.add_argument(
        "--vocab", type=at_least(0), default=0, help="embedding rows (0 = GPT-2's 50304), as the bench"
    )
    p.add_argument(
        "--steps", type=at_least(0), default=10, help="steps after the first call (default: %(default)s)"
    )
    p.add_argument("-k", type=at_least(1), default=5, help="precondition_frequency (default 5, as the bench)")
    args = p.parse_args(argv)
    specs = scaled_specs(args.model, args.layers, args.width or None, args.vocab or None)
    a = run(specs, args.steps, args.k, perturb=False)
    b = run(specs, args.steps, args.k, perturb=True)
    whole = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
    print(f"max |A - B| / max |A| over the parameters: {whole / max(x.abs().max().item() for x in a):.3e}")
    for spec, x, y in zip(specs, a, b, strict=True):
        print(f"  {spec.name}: {((x - y).abs().max() / x.abs().max().clamp_min(1e-30)).item():.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
