"""Train a tiny byte-level language model with SOAP and with AdamW, side by side, on one CPU.

Why this exists: it is the shortest end-to-end check that ``soap_dist.SOAP`` is a drop-in
``torch.optim.Optimizer`` that trains a real transformer on real text. It needs no download (the
corpus is the Python standard library's own source code), no GPU and no process group. Both runs
start from the same weights and see the same batches, so the two loss curves differ only by the
optimizer. It is a smoke test and an illustration, not a benchmark (see docs/benchmarks.md).

Run: ``python -m soap_dist.demo [--steps 300] [--batch-size 16] [--seed 0] [--threads N]``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from soap_dist import SOAP

CORPUS_BYTES = 2_000_000  # about 2 MB of text
HELD_OUT_FRACTION = 0.1  # the last 10% of the corpus is never trained on
EVAL_WINDOWS = 512  # held-out windows scored at the end
LOG_EVERY = 10
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256  # bytes
    context: int = 64
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    mlp_ratio: int = 4


def load_corpus(limit: int = CORPUS_BYTES) -> torch.Tensor:
    """The standard library's .py files (sorted by path, installed packages excluded), first `limit` bytes."""
    root = os.path.dirname(os.path.abspath(os.__file__))
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    chunks: list[bytes] = []
    for path in sorted(paths):
        with open(path, "rb") as fh:
            chunks.append(fh.read())
        if sum(map(len, chunks)) >= limit:
            break
    blob = b"".join(chunks)[:limit]
    if len(blob) < 100_000:
        raise RuntimeError(f"found only {len(blob)} bytes of Python source under {root}; need >= 100000")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a GELU MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """A small causal language model over bytes (about 0.47M parameters at the defaults)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(cfg.context, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


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
    starts = torch.linspace(0, len(data) - cfg.context - 1, EVAL_WINDOWS).long()
    total = 0.0
    for batch in starts.split(batch_size):
        total += lm_loss(model, *windows(data, batch, cfg.context)).item() * len(batch)
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
    args: argparse.Namespace,
) -> RunResult:
    """Train a fresh model (same seed, so same weights and batches for every optimizer)."""
    torch.manual_seed(args.seed)
    model = ByteLM(cfg)
    opt = make_opt(model.parameters())
    batches = torch.Generator().manual_seed(args.seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{name:>5}", unit="step", dynamic_ncols=True)
    for _ in bar:
        starts = torch.randint(0, len(train_data) - cfg.context - 1, (args.batch_size,), generator=batches)
        loss = lm_loss(model, *windows(train_data, starts, cfg.context))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    return RunResult(losses, evaluate(model, eval_data, cfg, args.batch_size), seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m soap_dist.demo",
        description="Train a tiny byte-level LM with SOAP and with AdamW on CPU.",
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and batches (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="torch.set_num_threads (default min(4, CPU count))",
    )
    args = p.parse_args(argv)
    for flag in ("steps", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    cfg = ModelConfig()
    data = load_corpus()
    split = int(len(data) * (1 - HELD_OUT_FRACTION))
    train_data, eval_data = data[:split], data[split:]
    n_params = sum(p.numel() for p in ByteLM(cfg).parameters())
    print(
        f"corpus: {len(data):,} bytes of the standard library's source ({len(train_data):,} train, "
        f"{len(eval_data):,} held out); model: {n_params:,} parameters; "
        f"{args.steps} steps x {args.batch_size} x {cfg.context} bytes; {args.threads} threads"
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
