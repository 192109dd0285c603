"""``python -m soap_dist.bench.scaling``: how soap_dist's distributed engine scales with the world size.

Why: the engine's promise is that a refresh's eigen-work is spread over the ranks (each factor has
one owner) and, under FSDP2, that the optimizer state is sharded. This runs the same GPT-2-like
parameter set with the same global gradients at world sizes 1, 2, 4 (spawned ranks, gloo on CPU,
NCCL with one GPU per rank when there are enough GPUs) and reports, per world size, the refresh time
per refresh, the per-rank state bytes, the bytes moved per refresh and per step, and step times, with
ratios against world 1, plus torch AdamW and plain per-tensor SOAP at world 1 measured in the same
run (the project's rule for benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

from soap_dist.bench.cli import at_least, int_list, name_list, refuse, writable_file
from soap_dist.bench.param_sets import MODELS, count_factors
from soap_dist.bench.report import describe_cpu, fmt_ratio, fmt_time, write_json
from soap_dist.bench.scaling_tables import NOTES, fmt, main_table, rank_table
from soap_dist.bench.scaling_worker import scaled_specs, worker

PLACEMENTS = ("replicated", "fsdp-local", "owner")
DELAYS = (0, 1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags, checked up front so that a bad value fails before any rank is spawned."""
    p = argparse.ArgumentParser(prog="python -m soap_dist.bench.scaling", description=__doc__)
    p.add_argument(
        "--worlds",
        type=int_list(1, "1,2,4"),
        default="1,2,4",
        help="comma list of world sizes (default 1,2,4)",
    )
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2-small")
    p.add_argument("--layers", type=at_least(1), default=1, help="transformer layers (default 1)")
    p.add_argument(
        "--width",
        type=at_least(0),
        default=256,
        help="narrow d_model to this (3d, 4d follow; 0 = the model's own d). Default 256, so the whole "
        "sweep runs in minutes on a 2-core CPU",
    )
    p.add_argument(
        "--vocab",
        type=at_least(0),
        default=12288,
        help="token-embedding rows (0 = GPT-2's 50304); keep it above --max-precond-dim so that, as in "
        "GPT-2, the embedding gets only its d-side factor",
    )
    p.add_argument("--k", type=at_least(1), default=5, help="precondition_frequency (default 5)")
    p.add_argument(
        "--placement",
        default=",".join(PLACEMENTS),
        help="comma list among replicated,fsdp-local,owner (default all three)",
    )
    p.add_argument(
        "--delays",
        type=int_list(0, "0,1"),
        default="0,1",
        help="comma list of refresh_delay values (default 0,1)",
    )
    p.add_argument("--steps", type=at_least(1), default=None, help="steps after the first call (default 2k)")
    p.add_argument(
        "--warmup", type=at_least(0), default=1, help="leading steps left out of the medians (default 1)"
    )
    p.add_argument("--max-precond-dim", type=at_least(0), default=10000)
    p.add_argument(
        "--block-size", type=at_least(1), default=None, help="soap_dist.SOAP block_size (default None)"
    )
    p.add_argument(
        "--fused",
        choices=("auto", "on", "off"),
        default="auto",
        help="soap_dist.SOAP fused= (auto = SOAP's default: eager on CPU; on CUDA compile, "
        "falling back to eager with a warning)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: NCCL + one GPU per rank if there are enough GPUs for the largest world, else gloo on CPU",
    )
    p.add_argument("--threads", type=at_least(1), default=1, help="torch threads per rank (default 1)")
    p.add_argument("--no-references", action="store_true", help="skip AdamW and plain SOAP at world 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        type=writable_file,
        default=None,
        metavar="PATH",
        help="write the raw per-rank numbers as JSON",
    )
    args = p.parse_args(argv)
    try:  # args.placement stays the text given, as the JSON's config has it
        args.placements = name_list(PLACEMENTS)(args.placement)
    except argparse.ArgumentTypeError as error:
        refuse(p, "--placement", str(error))
    _check_together(p, args)
    return args


def _check_together(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks that need several flags (and the defaults that follow from them)."""
    if any(d >= args.k for d in args.delays):
        refuse(p, "--delays", f"every delay must be in [0, k) with --k {args.k}, got {args.delays}")
    args.steps = 2 * args.k if args.steps is None else args.steps
    if args.steps < args.k:
        refuse(p, "--steps", f"must be >= --k ({args.k}) so that a refresh happens, got {args.steps}")
    if args.warmup >= args.steps:
        refuse(p, "--warmup", f"must be below --steps ({args.steps}): no step would be left to time")
    if 0 < args.vocab <= args.max_precond_dim:
        refuse(
            p,
            "--vocab",
            f"{args.vocab} <= --max-precond-dim {args.max_precond_dim} would give the embedding a "
            f"{args.vocab} x {args.vocab} row factor, unlike GPT-2 (and an hours-long eigh on a CPU)",
        )
    if args.device == "cuda" and torch.cuda.device_count() < max(args.worlds):
        refuse(p, "--device", f"cuda needs {max(args.worlds)} GPUs, found {torch.cuda.device_count()}")


# ----- launching -----
def pick_backend(worlds: Sequence[int], device: str) -> str:
    """NCCL with one GPU per rank when CUDA has a GPU for every rank of the largest world, else gloo on CPU.

    One backend for the whole sweep, so that every ratio against world 1 compares like with like.
    """
    enough = torch.cuda.is_available() and torch.cuda.device_count() >= max(worlds)
    if device == "cuda" and not enough:
        raise SystemExit(f"--device cuda needs {max(worlds)} GPUs, found {torch.cuda.device_count()}")
    return "nccl" if device != "cpu" and enough else "gloo"


def run_world(
    world: int, base: dict[str, Any], out_dir: str, placements: list[str], refs: bool, backend: str
) -> list[dict[str, Any]]:
    """Spawn ``world`` ranks, wait for them, return their JSON results sorted by rank."""
    init_file = os.path.join(out_dir, f"init_w{world}_{len(os.listdir(out_dir))}")
    cfg = dict(
        base,
        placements=placements,
        references=refs,
        backend=backend,
        init_method=f"file://{init_file}",
        out_dir=out_dir,
    )
    mp.spawn(worker, args=(world, cfg), nprocs=world, join=True)
    out = []
    for rank in range(world):
        path = os.path.join(out_dir, f"w{world}_rank{rank}.json")
        with open(path) as f:
            out.append(json.load(f))
        os.remove(path)
    return out


# ----- reading the numbers -----
def step_kinds(t: int, k: int, delay: int) -> str:
    """'refresh' when k | t; 'install' where a delayed basis is put in (t = jk + 1 + delay, j >= 1)."""
    if t % k == 0:
        return "refresh"
    if delay > 0 and t > k and (t - 1 - delay) % k == 0:
        return "install"
    return "plain"


def summarize(ranks: list[dict[str, Any]], k: int, warmup: int) -> dict[str, Any]:
    """One (world, placement, delay): the max over ranks of each step, and per-rank counters."""
    delay = ranks[0]["refresh_delay"]
    n = len(ranks[0]["step_s"])
    worst = [max(r["step_s"][i] for r in ranks) for i in range(n)]
    kept = [(i + 1, s) for i, s in enumerate(worst) if i + 1 > warmup]
    by_kind: dict[str, list[float]] = {"plain": [], "refresh": [], "install": []}
    for t, s in kept:
        by_kind[step_kinds(t, k, delay)].append(s)
    ends = [t for t, _ in kept if t % k == 0 and t - k + 1 > warmup]
    cycle = None
    if ends:
        end = max(ends)
        cycle = sum(worst[t - 1] for t in range(end - k + 1, end + 1)) / k
    per_rank = []
    for r in ranks:
        a, f = r["after_init"], r["final"]
        refreshes = f["refreshes"] - a["refreshes"]
        steps = len(r["step_s"])
        state = f["factor_bytes"] + f["basis_bytes"] + f["moment_bytes"]
        per_rank.append(
            {
                "rank": f["rank"],
                "placement": f["placement"],
                "refreshes": refreshes,
                "refresh_s": (f["refresh_seconds"] - a["refresh_seconds"]) / refreshes if refreshes else None,
                "owner_s": (f["owner_seconds"] - a["owner_seconds"]) / refreshes if refreshes else None,
                "init_s": r["init_s"],
                "factors_owned": f["factors_owned"],
                "owned_refresh_cost": f["owned_refresh_cost"],
                "factor_bytes": f["factor_bytes"],
                "basis_bytes": f["basis_bytes"],
                "moment_bytes": f["moment_bytes"],
                "state_bytes": state,
                "pending_bytes": r.get("pending_bytes"),
                "state_with_pending_bytes": state + (r.get("pending_bytes") or 0),
                "init_sent": a["bytes_sent"],
                "sent_per_refresh": (f["bytes_sent"] - a["bytes_sent"]) / refreshes if refreshes else None,
                "received_per_refresh": (f["bytes_received"] - a["bytes_received"]) / refreshes
                if refreshes
                else None,
                "sent_per_step": (f["bytes_sent"] - a["bytes_sent"]) / steps,
                "received_per_step": (f["bytes_received"] - a["bytes_received"]) / steps,
                "collectives_per_refresh": (f["collectives"] - a["collectives"]) / refreshes
                if refreshes
                else None,
                "refresh_failures": f["refresh_failures"],
                "checksum": r["checksum"],
            }
        )

    def top(key: str) -> float | None:
        vals = [p[key] for p in per_rank if p[key] is not None]
        return max(vals) if vals else None

    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    return {
        "placement": per_rank[0]["placement"],
        "requested": ranks[0]["requested"],
        "refresh_delay": delay,
        "world": len(ranks),
        "step_max_s": worst,
        "median_step_s": med(by_kind["plain"]),
        "refresh_step_s": med(by_kind["refresh"]),
        "install_step_s": med(by_kind["install"]),
        "cycle_mean_s": cycle,
        "init_max_s": max(r["init_s"] for r in ranks),
        "refresh_s": top("refresh_s"),
        "owner_s": top("owner_s"),
        "state_bytes": top("state_bytes"),
        "pending_bytes": top("pending_bytes"),
        "state_with_pending_bytes": top("state_with_pending_bytes"),
        "sent_per_refresh": top("sent_per_refresh"),
        "received_per_refresh": top("received_per_refresh"),
        "sent_per_step": top("sent_per_step"),
        "total_sent_per_refresh": sum(p["sent_per_refresh"] or 0 for p in per_rank),
        "ranks_agree": len({p["checksum"] for p in per_rank}) == 1,
        "per_rank": per_rank,
        "sample_path": next((r.get("sample_path") for r in ranks if r.get("sample_path")), None),
    }


def reference_summary(ref: dict[str, Any], k: int, warmup: int, refreshes: bool) -> dict[str, Any]:
    """AdamW's or plain SOAP's step times read the same way as soap_dist's (median, refresh, cycle mean)."""
    steps = ref["step_s"]
    kept = [(i + 1, s) for i, s in enumerate(steps) if i + 1 > warmup]
    plain = [s for t, s in kept if not (refreshes and t % k == 0)]
    ref_steps = [s for t, s in kept if refreshes and t % k == 0]
    ends = [t for t, _ in kept if t % k == 0 and t - k + 1 > warmup]
    cycle = sum(steps[t - 1] for t in range(max(ends) - k + 1, max(ends) + 1)) / k if ends else None
    return {
        "name": ref["name"],
        "init_s": ref["init_s"],
        "median_step_s": statistics.median(plain) if plain else None,
        "refresh_step_s": statistics.median(ref_steps) if ref_steps else None,
        "cycle_mean_s": cycle if refreshes else (statistics.median(plain) if plain else None),
        "step_s": steps,
    }


def sample_diff(path: str | None, base: str | None) -> float | None:
    """max |a - b| / max |b| over the strided parameter samples of two runs."""
    if not path or not base or not os.path.exists(path) or not os.path.exists(base):
        return None
    a, b = torch.load(path), torch.load(base)
    if a.shape != b.shape:
        return None
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def describe_source() -> str:
    """The commit the numbers were taken at, and whether soap_dist/ had uncommitted edits."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--name-only", "HEAD", "--", "soap_dist"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {head}" + (f" with uncommitted edits to {', '.join(dirty)}" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run every world size, then print the tables, the reference lines, the checks and the notes."""
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    width = None if args.width == 0 else args.width
    vocab = None if args.vocab == 0 else args.vocab
    specs = scaled_specs(args.model, args.layers, width, vocab)
    fc = count_factors(specs, args.max_precond_dim)
    d = width or MODELS[args.model][0]
    command = "python -m soap_dist.bench.scaling " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    cores = os.cpu_count() or 1
    fused = {"auto": None, "on": True, "off": False}[args.fused]
    base_cfg = dict(
        specs=[(s.name, list(s.shape)) for s in specs],
        k=args.k,
        steps=args.steps,
        seed=args.seed,
        max_precond_dim=args.max_precond_dim,
        block_size=args.block_size,
        fused=fused,
        threads=args.threads,
        delays=args.delays,
    )
    backend = pick_backend(args.worlds, args.device)
    header = [
        f"- command: `{command}`",
        f"- torch {torch.__version__}, python {platform.python_version()}; host: {describe_cpu()}, "
        f"os.cpu_count()={cores}; torch threads per rank: {args.threads}; soap_dist at {describe_source()}",
        f"- backend: {backend} ({'one GPU per rank' if backend == 'nccl' else 'CPU'}) at every world size",
        f"- parameters: {args.model}-like, {args.layers} layer(s), d={d}, vocab={specs[0].shape[0]}: "
        f"{fc['params'] / 1e6:.2f}M params in {fc['tensors']} tensors, {fc['factors']} factors "
        f"(max_precond_dim={args.max_precond_dim}, block_size={args.block_size})",
        f"- k = precondition_frequency = {args.k}; first call + {args.steps} steps per run, the first "
        f"{args.warmup} step(s) left out of medians (compile warmup); fused={args.fused}; seeded N(0,1) "
        "global gradients, the same at every world size (replicated: the whole gradient on every rank; "
        "fsdp-local: Shard(0) DTensor gradients, torch.chunk rows)",
        "- every step starts after a barrier; a step's time is the max over ranks",
    ]
    over = [w for w in args.worlds if w * args.threads > cores and backend == "gloo"]
    if over:
        header.append(
            f"- OVERSUBSCRIBED: world(s) {over} run more rank threads than the {cores} cores; their times "
            "measure contention as much as the engine (the byte counts and owner assignment do not)"
        )
    for line in header:
        log(line)

    summaries: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="soap_scaling_") as out_dir:
        want_refs = not args.no_references
        for world in args.worlds:
            with_refs = want_refs and world == 1
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            log(f"== world {world} ({backend}); load average before: {load} ==")
            ranks = run_world(world, base_cfg, out_dir, args.placements, with_refs, backend)
            raw[str(world)] = ranks
            refs += ranks[0]["refs"]
            for i in range(len(ranks[0]["runs"])):
                summaries.append(summarize([r["runs"][i] for r in ranks], args.k, args.warmup))
        if want_refs and 1 not in args.worlds:
            log("== references (1 process) ==")
            ranks = run_world(1, base_cfg, out_dir, [], True, backend)
            refs += ranks[0]["refs"]
        base = {(s["requested"], s["refresh_delay"]): s for s in summaries if s["world"] == 1}
        for s in summaries:
            b = base.get((s["requested"], s["refresh_delay"]))
            s["param_diff_vs_w1"] = sample_diff(s["sample_path"], b["sample_path"] if b else None)

    ref_sum = {r["name"]: reference_summary(r, args.k, args.warmup, r["name"] == "plain") for r in refs}
    lines = ["", f"## Scaling: {args.model}-like, {args.layers} layer(s), d={d}, k={args.k}", ""]
    lines += header + [""]
    lines.append("### Per world size (max over ranks; x W1 = ratio to world 1, same placement and delay)")
    lines.append("")
    lines.append(main_table(summaries, base, args.k))
    lines += ["", "### Per rank", "", rank_table(summaries), ""]
    lines.append("### Reference lines (world 1, one process, same parameters and gradients)")
    lines.append("")
    adamw, plain = ref_sum.get("adamw"), ref_sum.get("plain")
    if adamw:
        lines.append(f"- torch AdamW (foreach): median step {fmt_time(adamw['median_step_s'])}")
    if plain:
        lines.append(
            f"- plain per-tensor SOAP: median step {fmt_time(plain['median_step_s'])}, refresh step "
            f"{fmt(plain['refresh_step_s'], 't')}, mean of {args.k} steps {fmt(plain['cycle_mean_s'], 't')}"
        )
    for s in summaries:
        parts = []
        if adamw:
            parts.append(f"{fmt_ratio(s['cycle_mean_s'], adamw['median_step_s'])} AdamW's median step")
        if plain:
            parts.append(f"plain SOAP's mean / this = {fmt_ratio(plain['cycle_mean_s'], s['cycle_mean_s'])}")
        if parts:
            lines.append(
                f"- soap_dist world {s['world']} {s['placement']} delay {s['refresh_delay']}: mean of "
                f"{args.k} steps {fmt(s['cycle_mean_s'], 't')} = " + "; ".join(parts)
            )
    lines += ["", "### Checks", ""]
    lines.append(f"- load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for s in summaries:
        diff = s["param_diff_vs_w1"]
        lines.append(
            f"- world {s['world']} {s['placement']} delay {s['refresh_delay']}: ranks' parameter checksums "
            f"{'agree' if s['ranks_agree'] else 'DIFFER'}; parameters vs world 1 (max |diff| / max |w|): "
            f"{'-' if diff is None else f'{diff:.2e}'}; refresh failures "
            f"{sum(p['refresh_failures'] for p in s['per_rank'])}"
        )
    lines += ["", "### How to read it", ""] + NOTES
    if over:
        lines.append(
            f"- world(s) {over} are oversubscribed on this {cores}-core machine: their step and refresh "
            "times include waiting for a core; compare their bytes and owned costs, not their seconds."
        )
    print("\n".join(lines), flush=True)
    if args.json:
        write_json(
            args.json, command, header, vars(args), fc, summaries=summaries, references=ref_sum, raw=raw
        )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
