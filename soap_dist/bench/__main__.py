"""``python -m soap_dist.bench``: step times of AdamW, plain SOAP, soap_dist.SOAP and the floor in one run."""

from __future__ import annotations

import argparse
import ast
import gc
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from soap_dist.bench.cli import at_least, make_current, name_list, refuse, torch_device, writable_file
from soap_dist.bench.floor import Floor
from soap_dist.bench.param_sets import MODELS, ParamSpec, count_factors, gpt2_specs
from soap_dist.bench.plain_soap import PlainSOAP
from soap_dist.bench.report import LABELS, across_rounds, comparisons, describe_cpu, table, write_json
from soap_dist.bench.timing import MemoryProbe, Result, release_host_memory, time_optimizer

ORDER = ("floor", "adamw", "plain", "soap_dist")
HYPER: dict[str, Any] = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m soap_dist.bench", description=__doc__)
    p.add_argument(
        "--model", choices=sorted(MODELS), default="gpt2-small", help="parameter set (default: %(default)s)"
    )
    p.add_argument("--layers", type=at_least(1), default=None, help="override the model's layer count")
    p.add_argument(
        "--device",
        type=torch_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:N] (default: %(default)s)",
    )
    p.add_argument(
        "--steps", type=at_least(1), default=None, help="timed steps (default 20 on GPU, 3 on CPU)"
    )
    p.add_argument(
        "--warmup", type=at_least(0), default=None, help="untimed steps after the 1st call (3 GPU, 1 CPU)"
    )
    p.add_argument(
        "--precondition-frequency",
        type=at_least(1),
        default=10,
        help="k: refresh every k steps (default: %(default)s)",
    )
    p.add_argument(
        "--max-precond-dim",
        type=at_least(0),
        default=10000,
        help="a dim larger than this gets no factor, so 0 gives none (default: %(default)s)",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TF32 float32 matmuls on GPU (default on); ignored on CPU",
    )
    p.add_argument(
        "--only", type=name_list(ORDER), default=",".join(ORDER), help="comma list among " + ",".join(ORDER)
    )
    p.add_argument(
        "--soap-kw",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra soap_dist.SOAP keyword (python literal), e.g. block_size=2048; repeatable",
    )
    p.add_argument(
        "--stand-in",
        action="store_true",
        help="time PlainSOAP in the soap_dist slot (to test the harness while SOAP is missing)",
    )
    p.add_argument(
        "--rounds",
        type=at_least(1),
        default=1,
        help="run the chosen optimizers this many times, alternating, and report the median of each "
        "round's ratios (a shared machine's load then falls on every optimizer alike)",
    )
    p.add_argument(
        "--threads", type=at_least(1), default=os.cpu_count(), help="torch threads (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", type=writable_file, default=None, metavar="PATH", help="write all results as JSON"
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.steps = args.steps if args.steps is not None else (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.tf32 = (True if args.tf32 is None else args.tf32) if cuda else None
    if args.soap_kw and not args.stand_in:  # the header prints them: check them even with --only floor
        try:
            check_soap_kwargs(args)
        except ValueError as error:
            refuse(p, "--soap-kw", str(error))
    return args


# soap_dist.SOAP arguments the harness sets itself: through these flags, or HYPER's shared values
HARNESS_KEYS = {
    "params": "",
    "precondition_frequency": "--precondition-frequency",
    "max_precond_dim": "--max-precond-dim",
}


def soap_kwargs(items: list[str]) -> dict[str, Any]:
    """``--soap-kw KEY=VALUE`` items as SOAP keywords; ValueError naming the item for one that is not
    KEY=VALUE, names no SOAP argument, or whose VALUE is not a Python literal."""
    import inspect

    from soap_dist import SOAP

    known = set(inspect.signature(SOAP).parameters) - {"self"}
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"{item!r}: expected KEY=VALUE, e.g. --soap-kw block_size=2048")
        if key not in known:
            raise ValueError(
                f"{item!r}: soap_dist.SOAP has no argument {key!r}; it takes {', '.join(sorted(known))}"
            )
        if key in HARNESS_KEYS or key in HYPER:
            flag = HARNESS_KEYS.get(key)
            raise ValueError(
                f"{item!r}: the benchmark sets {key} itself"
                + (f"; use {flag}" if flag else " (the same for every optimizer)")
            )
        if key == "factor_dtype":
            dtype = getattr(torch, value.strip().removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{item!r}: {value!r} is not a torch dtype (e.g. float32, float64)")
            out[key] = dtype
            continue
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(
                f"{item!r}: {value!r} is not a Python literal (a number, string in quotes, "
                "True/False/None, tuple or list)"
            ) from None
    return out


SINGLE_PROCESS = ("auto", "single")  # the placements of one process stepping plain tensors


def check_soap_kwargs(args: argparse.Namespace) -> None:
    """ValueError naming the option when SOAP would refuse ``--soap-kw`` only after the optimizers timed
    before it (minutes): SOAP built on a dummy parameter checks every value, as the real one would."""
    from soap_dist import SOAP

    extra = soap_kwargs(args.soap_kw)
    dummy = torch.nn.Parameter(torch.zeros(2, 2))
    k, maxd = args.precondition_frequency, args.max_precond_dim
    try:
        SOAP([dummy], precondition_frequency=k, max_precond_dim=maxd, **HYPER, **extra)
    except TypeError as error:
        raise ValueError(str(error)) from None
    placement = extra.get("placement", "auto")
    if placement not in SINGLE_PROCESS:
        raise ValueError(
            f"placement={placement!r} needs a process group or sharded parameters; the benchmark steps "
            f"plain tensors in one process: use {' or '.join(map(repr, SINGLE_PROCESS))}"
        )


def load_soap(stand_in: bool) -> type | None:
    """soap_dist.SOAP, imported only when needed so the harness runs before the optimizer exists."""
    if stand_in:
        return PlainSOAP
    try:
        from soap_dist import SOAP
    except ImportError as e:
        print(f"soap_dist.SOAP is not importable ({e}); skipping it (use --stand-in to test the harness)")
        return None
    return SOAP


def build_params(specs: Sequence[ParamSpec], device: torch.device, seed: int) -> list[Tensor]:
    """Seeded random parameters with allocated gradient buffers (filled with fresh noise before each step)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in specs:
        p = torch.nn.Parameter(torch.randn(s.shape, device=device, generator=gen) * 0.02)
        p.grad = torch.empty_like(p)
        params.append(p)
    return params


def factory(
    name: str,
    params: list[Tensor],
    specs: Sequence[ParamSpec],
    args: argparse.Namespace,
    soap_cls: type | None,
) -> Callable[[], Any]:
    cuda = params[0].device.type == "cuda"
    k, maxd = args.precondition_frequency, args.max_precond_dim
    if name == "adamw":
        return lambda: torch.optim.AdamW(params, fused=cuda, foreach=not cuda, **HYPER)
    if name == "plain":
        return lambda: PlainSOAP(params, precondition_frequency=k, max_precond_dim=maxd, **HYPER)
    if name == "floor":
        return lambda: Floor(params, specs, max_precond_dim=maxd, seed=args.seed, **HYPER)
    assert soap_cls is not None
    extra = {} if args.stand_in else soap_kwargs(args.soap_kw)
    return lambda: soap_cls(params, precondition_frequency=k, max_precond_dim=maxd, **HYPER, **extra)


def run_round(
    args: argparse.Namespace,
    specs: Sequence[ParamSpec],
    device: torch.device,
    soap_cls: type | None,
    probe: MemoryProbe,
    log: Callable[[str], None],
) -> list[Result]:
    """Each chosen optimizer in turn, on freshly built parameters and the same seeded gradients."""
    k = args.precondition_frequency
    results: list[Result] = []
    for name in [n for n in ORDER if n in args.only]:
        if name == "soap_dist" and soap_cls is None:
            continue
        refreshes = name in ("plain", "soap_dist")
        n_steps = args.warmup + args.steps
        if refreshes:
            n_steps = max(n_steps, k * math.ceil((args.warmup + 1) / k))
        log(f"[{name}] building {len(specs)} params on {device}; first call + {n_steps} steps")
        params = build_params(specs, device, args.seed)
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        make = factory(name, params, specs, args, soap_cls)
        res = time_optimizer(name, make, params, n_steps, args.warmup, k, refreshes, probe, gen, log)
        results.append(res)
        log(
            f"[{name}] median {res.median:.4f} s, refresh {res.refresh}, worst {res.worst:.4f} s, "
            f"peak {res.peak_bytes / 2**20:.0f} MiB (+{res.extra_bytes / 2**20:.0f} MiB); all "
            f"{len(res.steps)} timed steps: median {res.all_median:.4f} s, mean {res.mean:.4f} s, "
            f"worst / median {res.worst / res.all_median:.2f}"
        )
        del params, make, gen
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        release_host_memory()
    return results


def describe_device(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU: {describe_cpu()}, {threads} threads (os.cpu_count()={os.cpu_count()})"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    if cuda:
        make_current(device)
        torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    log: Callable[[str], None] = lambda msg: print(msg, flush=True)  # noqa: E731

    specs = gpt2_specs(args.model, args.layers)
    n_layer = args.layers if args.layers is not None else MODELS[args.model][1]
    d = MODELS[args.model][0]
    fc = count_factors(specs, args.max_precond_dim)
    k = args.precondition_frequency
    command = "python -m soap_dist.bench " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    precision = "float32 params/grads/moments/factors/bases; float32 matmuls in " + (
        ("TF32 (torch precision 'high')" if args.tf32 else "full IEEE fp32 ('highest')")
        if cuda
        else "full fp32 (CPU)"
    )
    probe = MemoryProbe(device)
    header = [
        f"- command: `{command}`",
        f"- device: {describe_device(device, args.threads)}",
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- precision: {precision}",
        f"- model: {args.model}, {n_layer} layers (d={d}), {fc['params'] / 1e6:.1f}M params in "
        f"{fc['tensors']} tensors, {fc['matrices']} 2-D matrices",
        f"- factors (max_precond_dim={args.max_precond_dim}): {fc['factors']} = {fc['two_sided']} two-sided "
        f"matrices x 2 + {fc['one_sided']} one-sided (wte {specs[0].shape[0]}x{d} gets only its {d}-side "
        f"factor); wpe ({specs[1].shape[0]}x{d}, untied) included",
        f"- k = precondition_frequency = {k}; timed steps {args.steps} after the first call and "
        f"{args.warmup} warmup steps (SOAP runs extended to reach a refresh); fresh N(0,1) grads every step",
        f"- memory: {probe.method}; 'extra' = peak minus the params+grads in use when the optimizer is built",
    ]
    if args.soap_kw and not args.stand_in:
        header.append(f"- soap_dist.SOAP extra kwargs: {soap_kwargs(args.soap_kw)}")
    for line in header:
        log(line)

    soap_cls = load_soap(args.stand_in) if "soap_dist" in args.only else None
    labels = dict(LABELS)
    if args.stand_in:
        labels["soap_dist"] = "soap_dist slot (stand-in: PlainSOAP)"
    rounds: list[list[Result]] = []
    for r in range(args.rounds):
        if args.rounds > 1:
            log(f"== round {r + 1} of {args.rounds}")
        rounds.append(run_round(args, specs, device, soap_cls, probe, log))

    full_medium = args.model == "gpt2-medium" and n_layer == MODELS["gpt2-medium"][1]
    print("\n## Step time: " + f"{args.model}, {n_layer} layers, {'GPU' if cuda else 'CPU'}\n")
    print("\n".join(header) + "\n")
    notes: list[str] = []
    for r, results in enumerate(rounds):
        if args.rounds > 1:
            print(f"### Round {r + 1} of {args.rounds}\n")
        notes = comparisons(results, k, cuda, full_medium)
        print(table(results, k, labels) + "\n")
        print("\n".join(notes) + "\n", flush=True)
    if args.rounds > 1:
        notes = across_rounds(rounds, k, cuda, full_medium)
        print(f"### Across the {args.rounds} rounds (median of the per-round ratios)\n")
        print("\n".join(notes), flush=True)
    if args.json:
        results_json = [[res.as_dict(k) for res in results] for results in rounds]
        if args.rounds == 1:
            results_json = results_json[0]
        write_json(args.json, command, header, vars(args), fc, results=results_json, notes=notes)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
