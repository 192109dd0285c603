"""Train a tiny byte-level language model with SOAP and with AdamW, side by side, on one CPU.

Why this exists: it is the shortest end-to-end check that ``soap_dist.SOAP`` is a drop-in
``torch.optim.Optimizer`` that trains a real transformer on real text. It needs no download (the
corpus is the Python standard library's own source code), no GPU and no process group. Both runs
start from the same weights and see the same batches, so the two loss curves differ only by the
optimizer. It is a smoke test and an illustration, not a benchmark (see docs/benchmarks.md).

Run: ``python launchers/demo.py [--steps 300] [--batch-size 16] [--seed 0] [--threads N]
[--set key=value ...]``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from soap_apps.config_loader import ConfigError, add_override_flag, parse_override, require, set_field
from soap_apps.pretrain.config import ModelConfig
from soap_apps.pretrain.data import stdlib_files, stdlib_root
from soap_apps.pretrain.model import GPT
from soap_dist import SOAP

CORPUS_BYTES = 2_000_000  # about 2 MB of text
HELD_OUT_FRACTION = 0.1  # the last 10% of the corpus is never trained on
EVAL_WINDOWS = 512  # held-out windows scored at the end
LOG_EVERY = 10

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


# the pretraining launcher's GPT (soap_apps.pretrain.model), at a demo size: about 0.47M parameters
MODEL = ModelConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=2, n_heads=4, mlp_ratio=4)


def load_corpus(limit: int = CORPUS_BYTES) -> torch.Tensor:
    """The standard library's .py files (sorted by path, installed packages excluded), first `limit` bytes."""
    chunks: list[bytes] = []
    for path in stdlib_files():
        chunks.append(path.read_bytes())
        if sum(map(len, chunks)) >= limit:
            break
    blob = b"".join(chunks)[:limit]
    if len(blob) < 100_000:
        raise RuntimeError(
            f"found only {len(blob)} bytes of Python source under {stdlib_root()}; need >= 100000"
        )
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets for the windows of `context` bytes beginning at `starts`."""
    chunk = data[starts[:, None] + torch.arange(context + 1)]
    return chunk[:, :-1], chunk[:, 1:]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, cfg: ModelConfig, batch_size: int) -> float:
    """Mean next-byte loss (nats) over EVAL_WINDOWS evenly spaced held-out windows."""
    model.eval()
    starts = torch.linspace(0, len(data) - cfg.seq_len - 1, EVAL_WINDOWS).long()
    total = 0.0
    for batch in starts.split(batch_size):
        total += lm_loss(model, *windows(data, batch, cfg.seq_len)).item() * len(batch)
    model.train()
    return total / len(starts)


@dataclass
class RunResult:
    losses: list[float]
    eval_loss: float
    seconds: float


def train(
    name: str,
    make_opt: OptimizerFactory,
    train_data: torch.Tensor,
    eval_data: torch.Tensor,
    cfg: ModelConfig,
    args: DemoConfig,
) -> RunResult:
    """Train a fresh model (same seed, so same weights and batches for every optimizer)."""
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    opt = make_opt(model.parameters())
    batches = torch.Generator().manual_seed(args.seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{name:>5}", unit="step", dynamic_ncols=True)
    for _ in bar:
        starts = torch.randint(0, len(train_data) - cfg.seq_len - 1, (args.batch_size,), generator=batches)
        loss = lm_loss(model, *windows(train_data, starts, cfg.seq_len))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    return RunResult(losses, evaluate(model, eval_data, cfg, args.batch_size), seconds)


@dataclass
class DemoConfig:
    """The demo's settings: the flags, or ``--set key=value`` through the applications' config loader."""

    steps: int = 300  # optimizer steps per run
    batch_size: int = 16  # sequences per step
    seed: int = 0  # seed for weights and batches
    threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))  # torch.set_num_threads

    def validate(self) -> None:
        for key in ("steps", "batch_size", "threads"):
            require(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    """Flags -> a validated DemoConfig: the defaults, then each ``--set key=value`` (the loader's
    messages for an unknown key or a bad value), then the explicit flags."""
    p = argparse.ArgumentParser(
        prog="python launchers/demo.py",
        description="Train a tiny byte-level LM with SOAP and with AdamW on CPU.",
    )
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 300)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 16)")
    p.add_argument("--seed", type=int, help="seed for weights and batches (default 0)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default min(4, CPU count))")
    add_override_flag(
        p, "KEY=VALUE", "set any setting by name (steps, batch_size, seed, threads); repeatable"
    )
    args = p.parse_args(argv)
    cfg = DemoConfig()
    try:
        for text in args.overrides:
            key, value = parse_override(text, "key=value", "steps=20")
            set_field(cfg, key, value, key=key, where=f"from the override {text!r}")
        for f in fields(DemoConfig):
            if getattr(args, f.name) is not None:
                setattr(cfg, f.name, getattr(args, f.name))
        cfg.validate()
    except ConfigError as err:
        p.error(str(err))
    return cfg


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    cfg = MODEL
    data = load_corpus()
    split = int(len(data) * (1 - HELD_OUT_FRACTION))
    train_data, eval_data = data[:split], data[split:]
    n_params = sum(p.numel() for p in GPT(cfg).parameters())
    print(
        f"corpus: {len(data):,} bytes of the standard library's source ({len(train_data):,} train, "
        f"{len(eval_data):,} held out); model: {n_params:,} parameters; "
        f"{args.steps} steps x {args.batch_size} x {cfg.seq_len} bytes; {args.threads} threads"
    )
    # Same betas and weight decay for both, for a fair comparison (SOAP's reference defaults).
    common = {"lr": 3e-3, "betas": (0.95, 0.95), "weight_decay": 0.01}

    def make_soap(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return SOAP(params, precondition_frequency=10, **common)

    def make_adamw(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, **common)

    results = {
        name: train(name, make, train_data, eval_data, cfg, args)
        for name, make in (("SOAP", make_soap), ("AdamW", make_adamw))
    }
    soap, adamw = results["SOAP"], results["AdamW"]

    print(f"\ntrain loss (nats/byte), mean of the {LOG_EVERY} steps ending at each row")
    print(f"{'step':>6} {'SOAP':>9} {'AdamW':>9}")
    rows = list(range(LOG_EVERY, args.steps + 1, LOG_EVERY))
    if not rows or rows[-1] != args.steps:
        rows.append(args.steps)
    for step in rows:
        lo = max(0, step - LOG_EVERY)
        window = [sum(r.losses[lo:step]) / (step - lo) for r in (soap, adamw)]
        print(f"{step:>6} {window[0]:>9.4f} {window[1]:>9.4f}")
    print("\nheld-out loss after training (nats/byte, bits/byte in brackets):")
    for name, r in results.items():
        bits = r.eval_loss / math.log(2)
        print(f"  {name:>5}: {r.eval_loss:.4f} ({bits:.3f})  [{r.seconds:.1f} s of training]")
    print(
        "(SOAP's first step only builds its preconditioner and does not move the weights, as in the "
        "reference SOAP.)"
    )


if __name__ == "__main__":
    main()
