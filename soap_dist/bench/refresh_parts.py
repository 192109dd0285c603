"""Where a refresh's time goes, piece by piece: ``python -m soap_dist.bench.refresh_parts``.

For a batch of float32 factors of each size (one refresh chunk), times each piece of the refresh
(the power product, the Gram matrix, the Cholesky, the triangular inverse, X L^-T, and, for
comparison, the triangular solve the GEMM form replaced and Householder QR; cuSOLVER's Cholesky
plus ``lower_inverse`` against ``qr.inverse_cholesky``, which gives the same L^-1 in GEMMs), the
whole refresh by each QR (CholeskyQR2 with either Cholesky), and one plain TF32 GEMM of the same
shape (the floor). The last table sums the whole
refresh over a model's factor set (``--model``, the bench's shape sets), per factor of each size,
to compare with the full-refresh target without running the optimizer.

On CUDA it then times the refresh that reads nothing on the host (the one ``async_refresh`` runs)
eagerly and replayed from a CUDA graph captured once: the gap is what kernel launches cost, the
lever the last GPU measurements pointed at. A capture that fails is reported, not fatal; the
numbers before it are written first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch

from .. import linalg, qr
from .cli import at_least, int_list, make_current, torch_device, writable_file
from .param_sets import MODELS, factor_dims, gpt2_specs


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up (CUDA events on a GPU)."""

    def time_it(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return time_it


def _problem(n: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-rank factors (eigenvalues over 1e-4..1) and a basis near their eigenbasis."""
    gen = torch.Generator(device=device).manual_seed(d)
    vectors, _ = torch.linalg.qr(torch.randn(n, d, d, device=device, generator=gen))
    lam = torch.logspace(0, -4, d, device=device)
    factors = (vectors * lam) @ vectors.mT
    near, _ = torch.linalg.qr(vectors + 1e-3 * torch.randn(n, d, d, device=device, generator=gen))
    return factors, near


def _with_blocked_cholesky(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with qr.inverse_cholesky in place of cuSOLVER's Cholesky, for every size."""

    def run() -> object:
        previous, qr.BLOCKED_CHOLESKY_FROM = qr.BLOCKED_CHOLESKY_FROM, 0
        try:
            return fn()
        finally:
            qr.BLOCKED_CHOLESKY_FROM = previous

    return run


def measure(d: int, n: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds per piece for a batch of n factors of size d."""
    time_it = _timer(device, repeats)
    factors, basis = _problem(n, d, device)
    x = qr.accurate_matmul(factors, basis)
    gram = qr.accurate_gram(x)
    lower = torch.linalg.cholesky(gram)
    inverse = qr.lower_inverse(lower)

    def plain_tf32() -> torch.Tensor:
        with qr.tf32_matmuls():
            return torch.bmm(factors, basis)

    out = {
        "gemm_floor (one TF32 GEMM)": time_it(plain_tf32),
        "power F Q (3xTF32)": time_it(lambda: qr.accurate_matmul(factors, basis)),
        "gram X^T X (2 products)": time_it(lambda: qr.accurate_gram(x)),
        "cholesky": time_it(lambda: torch.linalg.cholesky_ex(gram)),
        "lower_inverse": time_it(lambda: qr.lower_inverse(lower)),
        "lower_inverse by halves (recursive)": time_it(lambda: qr._lower_inverse_by_halves(lower)),
        "L^-1: cholesky + lower_inverse": time_it(
            lambda: qr.lower_inverse(torch.linalg.cholesky_ex(gram)[0])
        ),
        "L^-1: inverse_cholesky (blocked, 3xTF32)": time_it(lambda: qr.inverse_cholesky(gram)),
        "X L^-T (3xTF32)": time_it(lambda: qr.accurate_matmul(x, inverse.mT)),
        "trsm X L^-T (old path)": time_it(
            lambda: torch.linalg.solve_triangular(lower.mT, x, upper=True, left=False)
        ),
        "QR cholesky_qr2": time_it(lambda: qr.orthonormalize_(x.clone(), "cholesky_qr2")),
        "QR householder": time_it(lambda: qr.orthonormalize_(x.clone(), "householder")),
        "refresh cholesky_qr2": time_it(
            lambda: linalg.power_iteration_refresh(factors, basis, "cholesky_qr2")
        ),
        "refresh householder": time_it(lambda: linalg.power_iteration_refresh(factors, basis, "householder")),
        "refresh cholesky_qr2_blocked": time_it(
            _with_blocked_cholesky(lambda: linalg.power_iteration_refresh(factors, basis, "cholesky_qr2"))
        ),
    }
    return {k: v / n for k, v in out.items()}  # per factor


NO_HOST_READS = "refresh cholesky_qr2, no host reads"
GRAPHED = "refresh cholesky_qr2, no host reads, CUDA graph replay"


def _captured(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph, as its replay (warmed up on a side stream first, as capture
    needs); raises what the capture raised."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # ending a broken capture raises anew: name the first error
        cause = error.__context__ or error
        lines = str(cause).splitlines()
        raise RuntimeError(f"{type(cause).__name__}: {lines[0] if lines else ''}") from cause
    return graph.replay


def measure_graphed(d: int, n: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds per factor of the refresh with no host reads, eager and as a CUDA graph's replay."""
    time_it = _timer(device, repeats)
    factors, basis = _problem(n, d, device)

    def refresh() -> object:
        return linalg.power_iteration_refresh(factors, basis, "cholesky_qr2", fallback=False)

    out = {NO_HOST_READS: time_it(refresh) / n}
    out[GRAPHED] = time_it(_captured(refresh)) / n
    return out


def _totals(rows: dict, counts: Counter, sizes: list[int]) -> tuple[dict[str, float], float]:
    """Seconds of a full refresh of the model's factors by each "refresh ..." row, and the floor."""
    names = [name for name in rows[sizes[0]] if name.startswith("refresh ")]
    totals = {name[len("refresh ") :]: sum(counts.get(d, 0) * rows[d][name] for d in sizes) for name in names}
    return totals, sum(counts.get(d, 0) * rows[d]["gemm_floor (one TF32 GEMM)"] for d in sizes)


def _print_table(title: str, rows: dict, sizes: list[int], pieces: list[str]) -> None:
    print(f"| {title} | " + " | ".join(f"d = {d}" for d in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for piece in pieces:
        print(f"| {piece} | " + " | ".join(f"{rows[d][piece] * 1e3:.2f}" for d in sizes) + " |")


def _write(
    path: str | None, rows: dict, counts: Counter, sizes: list[int], device: torch.device, **extra
) -> None:
    if not path:
        return
    totals, floor = _totals(rows, counts, sizes)
    numbers = {"device": str(device), "per_factor_s": rows, "totals_s": totals, "gemm_floor_s": floor}
    numbers.update(counts=dict(counts), sizes=sizes, complete=True)
    numbers.update(extra)
    with open(f"{path}.part", "w") as f:  # then renamed: a run killed mid-write leaves the last whole file
        json.dump(numbers, f, indent=1)
    os.replace(f"{path}.part", path)


def factor_sizes(model: str, max_precond_dim: int = 10000) -> Counter:
    """How many factors of each size the model's matrices have (the page's rule, param_sets)."""
    sizes: Counter = Counter()
    for spec in gpt2_specs(model):
        has = factor_dims(spec.shape, max_precond_dim)
        sizes.update(d for d, yes in zip(spec.shape, has, strict=True) if yes)
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m soap_dist.bench.refresh_parts", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="gpt2-medium", choices=sorted(MODELS))
    parser.add_argument(
        "--sizes", type=int_list(1, "256,1024"), help="comma-separated factor sizes (default: the model's)"
    )
    parser.add_argument(
        "--batch-bytes", type=at_least(1), default=1 << 29, help="a chunk, as the engine cuts"
    )
    parser.add_argument(
        "--max-batch", type=at_least(1), default=8, help="at most this many factors per batch"
    )
    parser.add_argument(
        "--repeats",
        type=at_least(1),
        default=3,
        help="timed runs per piece, median kept (default: %(default)s)",
    )
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=writable_file, help="also write the numbers here")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA graph rows")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    make_current(device)
    counts = factor_sizes(args.model)
    sizes = args.sizes or sorted(counts)
    # factors batched per size, within the byte budget (the graph rows reuse the same batches)
    batch = {d: max(1, min(args.max_batch, args.batch_bytes // (d * d * 4))) for d in sizes}
    rows = {}
    for i, d in enumerate(sizes):
        rows[d] = measure(d, batch[d], device, args.repeats)
        print(f"d = {d}: batch {batch[d]}", flush=True)
        if i + 1 < len(sizes):  # a run cut short keeps what it measured ("complete": false)
            _write(args.json, rows, counts, sizes[: i + 1], device, model=args.model, complete=False)
    print(f"\nms per factor on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    _print_table("piece", rows, sizes, list(rows[sizes[0]]))
    totals, floor = _totals(rows, counts, sizes)
    print(f"\n{args.model}: {sum(counts.get(d, 0) for d in sizes)} factors {dict(sorted(counts.items()))}")
    for name, seconds in totals.items():
        ratio = f" ({seconds / floor:.1f}x one TF32 GEMM per factor)" if floor else ""
        print(f"full refresh of those factors, {name}: {seconds:.3f} s{ratio}")
    _write(args.json, rows, counts, sizes, device, model=args.model)
    if device.type != "cuda" or args.no_graphs:
        return
    graphed = {}
    try:  # after the numbers above are written: a capture that fails must not lose them
        for d in sizes:
            graphed[d] = measure_graphed(d, batch[d], device, args.repeats)
    except Exception as error:  # e.g. a kernel that cannot be captured
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"\nCUDA graph capture of the refresh failed: {reason}")
        _write(args.json, rows, counts, sizes, device, model=args.model, graph_error=reason)
        return
    for d in sizes:
        rows[d].update(graphed[d])
    print()
    _print_table("refresh, ms per factor", rows, sizes, [NO_HOST_READS, GRAPHED])
    totals, _ = _totals(rows, counts, sizes)
    for piece in (NO_HOST_READS, GRAPHED):
        name = piece[len("refresh ") :]
        print(f"full refresh of those factors, {name}: {totals[name]:.3f} s")
    _write(args.json, rows, counts, sizes, device, model=args.model)


if __name__ == "__main__":
    main()
