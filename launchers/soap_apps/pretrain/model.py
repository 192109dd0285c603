"""A compact GPT-style decoder, and the export format other launchers load it from.

Token + learned position embeddings, pre-LayerNorm blocks (causal self-attention through
``F.scaled_dot_product_attention``, then a GELU MLP of width ``mlp_ratio * d_model``), a final
LayerNorm and an untied output head. Initialisation follows GPT-2 (normal(0, 0.02); the two residual
output projections of each block scaled by 1/sqrt(2 * n_layers)).

Why the head is untied: a shared embedding/head matrix is one parameter reached from two modules,
which FSDP2 (root vs. block units), DCP (two FQNs for one tensor) and DeepSpeed ZeRO-3 (one partition
gathered by two hooks) each handle in their own special way; untied, every parameter has one owner
and one name. For byte-level vocabularies the extra head is tiny (256 x d_model).

Why the blocks are an ``nn.ModuleList`` named ``blocks``: ``parallel.wrap_model`` shards each block as
one FSDP2 unit, and the export keys (``blocks.0.attn.qkv.weight``...) stay the same in every mode.

``export(model, cfg, directory)`` writes ``model.pt`` (a plain state_dict of this class, fp32) and
``config.json`` (the ModelConfig fields); ``load_exported(path)`` rebuilds the model from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from soap_apps.pretrain.config import ModelConfig

EXPORT_FORMAT = "soap_dist.pretrain.GPT/1"  # the old package name, kept: earlier exports still load


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only language model: token ids (batch, seq) -> next-token logits (batch, seq, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"GPT: input has {t} tokens, more than model.seq_len={self.cfg.seq_len}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (logits may be bf16 under autocast)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def export(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, directory: str | Path, **info: object
) -> Path:
    """Write ``model.pt`` (fp32 CPU state_dict of GPT) and ``config.json``; returns the directory.

    ``info`` adds fields to config.json (e.g. the step and the data source) for the reader's benefit.
    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    meta = {"format": EXPORT_FORMAT, "model": dataclasses.asdict(cfg), **info}
    tmp = directory / f".model.pt.tmp{os.getpid()}"
    torch.save(tensors, tmp)
    os.replace(tmp, directory / "model.pt")
    tmp = directory / f".config.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, directory / "config.json")
    return directory


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    """The GPT saved by ``export``; ``path`` is its directory or its ``model.pt`` (config.json beside it)."""
    path = Path(path)
    if not path.exists():  # named as given: its parent's model.pt would be the wrong file to name
        raise FileNotFoundError(
            f"load_exported: {path} does not exist; pass the final/ directory a pre-training run wrote "
            "(it holds model.pt and config.json)"
        )
    directory = path if path.is_dir() else path.parent
    weights = path if path.is_file() else directory / "model.pt"
    for needed in (weights, directory / "config.json"):
        if not needed.is_file():
            raise FileNotFoundError(
                f"load_exported: {needed} is missing; pass the final/ directory a pre-training run wrote "
                "(it holds model.pt and config.json)"
            )
    meta = json.loads((directory / "config.json").read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"load_exported: {directory / 'config.json'} has format {meta.get('format')!r}, "
            f"expected {EXPORT_FORMAT!r}"
        )
    model = GPT(ModelConfig(**meta["model"]))
    model.load_state_dict(torch.load(weights, map_location=map_location, weights_only=True))
    return model
