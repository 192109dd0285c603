"""The model to fine-tune, and the one loss every route uses.

Two sources: a transformers GPT-2 built from a small config (vocabulary = the 256 byte values, so no
tokenizer and no download), or a pre-training export (``launchers/pretrain.py`` writes
``runs/X/final``; loaded through ``soap_apps.pretrain.model.load_exported``, imported only when
asked for so that this package works without the pre-training one).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from soap_apps.config_loader import ConfigError

BYTE_VOCAB = 256
GPT2_PRESETS: dict[str, dict[str, int]] = {
    # ~0.45M parameters (at context 128): 2 blocks of width 128; trains on 2 CPU cores in minutes
    "gpt2-tiny": dict(n_layer=2, n_embd=128, n_head=4),
}
CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "context", "block_size", "max_seq_len", "seq_len")


def build_gpt2(preset: str, context: int) -> nn.Module:
    """A randomly initialised transformers GPT2LMHeadModel over bytes, without dropout (the windows
    are short and fine-tuning runs are short; dropout would only add noise to the comparison)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in GPT2_PRESETS:
        raise ValueError(f"--model={preset!r} is unknown: expected one of {sorted(GPT2_PRESETS)}")
    config = GPT2Config(
        vocab_size=BYTE_VOCAB,
        n_positions=context,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        **GPT2_PRESETS[preset],
    )
    return GPT2LMHeadModel(config)


def _config_value(model: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first integer ``model.config.<name>`` or ``model.cfg.<name>`` found, else None."""
    for holder in (getattr(model, "config", None), getattr(model, "cfg", None)):
        for name in names:
            value = getattr(holder, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def load_export(path: str, context: int) -> nn.Module:
    """A pre-training export as an nn.Module, checked against the fine-tuning window and byte vocabulary
    (a mismatch is a ConfigError naming the flag to change)."""
    try:
        from soap_apps.pretrain.model import load_exported
    except ImportError as err:
        raise ImportError(
            f"--init-from {path!r} needs soap_apps.pretrain.model.load_exported (the pre-training package, "
            f"launchers/pretrain.py); it could not be imported: {err}"
        ) from err
    model = load_exported(path)
    limit = _config_value(model, CONTEXT_ATTRS)
    if limit is not None and context > limit:
        raise ConfigError(
            f"--context={context} exceeds the exported model's context of {limit} (--init-from {path!r}); "
            f"pass --context {limit} or less"
        )
    vocab = _config_value(model, ("vocab_size",))
    if vocab is not None and vocab < BYTE_VOCAB:
        raise ConfigError(
            f"--init-from {path!r}: the exported model's vocab_size={vocab} is smaller than the "
            f"{BYTE_VOCAB} byte values fine-tuning feeds it; pass --init-from the final/ directory of a "
            "byte-level pre-training run (data.path a directory of text files, "
            f"model.vocab_size {BYTE_VOCAB})"
        )
    if getattr(model, "_no_split_modules", None) is None:
        # Accelerate's transformer-based FSDP wrap shards the classes named here (HF models name
        # theirs); use the class of the first ModuleList's items, i.e. the transformer blocks.
        blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0), None)
        if blocks is not None:
            model._no_split_modules = [type(blocks[0]).__name__]
    return model


def build_model(cfg: Any) -> nn.Module:
    """``cfg.init_from`` if given, else the ``cfg.model`` preset (a FinetuneConfig or anything alike)."""
    if cfg.init_from:
        return load_export(cfg.init_from, cfg.context)
    return build_gpt2(cfg.model, cfg.context)


def logits_of(output: Any) -> torch.Tensor:
    """Logits from an HF ModelOutput, a (logits, ...) tuple, or a bare tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in the model's output of type {type(output).__name__}")


def window_losses(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-window mean next-byte loss (nats), in float32: bytes 2..T predicted from their prefixes,
    the same shift HF's causal-LM loss applies to ``labels=input_ids``."""
    logits = logits_of(model(ids))[:, :-1].float()
    targets = ids[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return loss.view(targets.shape).mean(dim=1)
