"""Pre-train a small GPT with SOAP (or AdamW): one process, torchrun (FSDP2/DDP/HSDP) or DeepSpeed.

    torchrun --standalone --nproc_per_node=2 launchers/pretrain.py          # tiny-cpu, FSDP2, gloo
    python launchers/pretrain.py --config configs/pretrain/tiny-cpu.yaml    # one process
    torchrun --standalone --nproc_per_node=8 launchers/pretrain.py --config configs/pretrain/gpt2-small.yaml
    torchrun --standalone --nproc_per_node=2 launchers/pretrain.py --deepspeed configs/deepspeed/zero2.json

Everything else (flags, config keys, outputs, multi-node, resume) is in docs/pretrain.md. This file
only parses arguments, and turns SIGTERM (a preemption; torchrun forwards it) into the interrupt
Ctrl-C raises while the run lasts; the work is in soap_apps.pretrain.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from soap_apps.config_loader import add_override_flag
from soap_apps.pretrain.config import ConfigError, load_config
from soap_apps.pretrain.resume_check import (
    Interrupted,
    resume_command,
    signal_and_exit_code,
    sigterm_as_interrupt,
)
from soap_apps.pretrain.trainer import NonFiniteLoss, backend_name, run
from soap_apps.process_exit import run_and_finish

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "tiny-cpu.yaml"

# explicit flags: each is a shortcut for one --set override
SHORTCUTS = {
    "steps": ("train.steps", int, "optimizer steps"),
    "optimizer": ("optim.name", str, "soap or adamw"),
    "parallel": ("parallel.mode", str, "fsdp2, ddp, hsdp or single"),
    "data": ("data.path", str, "a directory of text files or a uint16 .bin"),
    "seed": ("train.seed", int, "seed of the weights and the data order"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launchers/pretrain.py",
        description="Pre-train a GPT-style language model with SOAP or AdamW (see docs/pretrain.md).",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="YAML config (default: configs/pretrain/tiny-cpu.yaml)",
    )
    add_override_flag(
        p,
        "SECTION.KEY=VALUE",
        "override one config key, e.g. --set train.steps=20 (repeatable; value parsed as YAML)",
    )
    for flag, (key, kind, what) in SHORTCUTS.items():
        p.add_argument(f"--{flag}", type=kind, help=f"{what} (same as --set {key}=..., and wins over it)")
    p.add_argument(
        "--out",
        type=Path,
        help="run directory, new or empty unless --resume (default: runs/pretrain-<config name>-<backend>, "
        "backend fsdp2, ddp, hsdp, single or deepspeed-<JSON name>)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the run directory"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="STEP",
        help="stop after this step with a checkpoint, as if interrupted (the schedule spans train.steps)",
    )
    p.add_argument(
        "--deepspeed", metavar="JSON", help="train through DeepSpeed with this config (configs/deepspeed/)"
    )
    p.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # the deepspeed launcher's
    return p.parse_args(argv)


def _script() -> str:
    """This launcher's path as it is best typed here (relative to the working directory if it can be)."""
    try:
        return os.path.relpath(__file__)
    except ValueError:  # another drive
        return str(Path(__file__).resolve())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: list[str | tuple[str, object]] = list(args.overrides)
    overrides += [
        (key, getattr(args, flag))
        for flag, (key, _, _) in SHORTCUTS.items()
        if getattr(args, flag) is not None
    ]
    world = int(os.environ.get("WORLD_SIZE") or 1)  # set by torchrun and the deepspeed launcher
    if args.deepspeed and args.parallel is not None:  # it was ignored, silently
        print(
            f"launchers/pretrain.py: error: --parallel {args.parallel} with --deepspeed: DeepSpeed does the "
            "data parallelism (ZeRO, as the JSON says); drop --parallel",
            file=sys.stderr,
        )
        return 2
    try:
        with sigterm_as_interrupt():
            cfg = load_config(args.config, overrides)
            backend = backend_name(cfg, world, args.deepspeed)
            out = args.out or Path("runs") / f"pretrain-{args.config.stem}-{backend}"
            run(
                cfg,
                run_dir=out,
                resume=args.resume,
                stop_after=args.stop_after,
                deepspeed_config=args.deepspeed,
                name=args.config.stem,
            )
    except ConfigError as error:  # bad input: a one-line message naming the key, not a traceback
        print(f"launchers/pretrain.py: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss:  # every rank stops at the same step; rank 0 has printed why
        return 1
    except Interrupted as stop:  # Ctrl-C or SIGTERM during the run: rank 0 says what was kept
        if stop.is_main:
            command = resume_command(_script(), sys.argv[1:] if argv is None else argv, out, world > 1)
            print(f"pretrain: {stop.message}; to continue: {command}", file=sys.stderr, flush=True)
        return stop.exit_code
    except KeyboardInterrupt as stop:  # before the run began (reading the config, ...)
        signame, code = signal_and_exit_code(stop)
        if os.environ.get("RANK", "0") == "0":
            print(f"pretrain: interrupted by {signame} before training started", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    run_and_finish(main)
