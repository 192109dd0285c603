"""Byte-level text data: read a corpus, split it, and serve fixed windows in a seeded order.

Bytes need no tokenizer (nothing to download). The training order is decided by the dataset, not by
a shuffling sampler: sample ``i`` is window ``perm_e[i mod n]`` of epoch ``e = i // n``, each epoch a
fresh seeded permutation. A plain sequential DataLoader over it can then be sharded by Accelerate
and resumed exactly with ``skip_first_batches``; no sampler state has to be checkpointed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from soap_apps.config_loader import ConfigError

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}
MIN_BYTES = 1_000


def _files_under(root: Path) -> list[Path]:
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(TEXT_SUFFIXES))
    return sorted(paths)


def load_bytes(path: str | None, limit: int) -> torch.Tensor:
    """The first ``limit`` bytes of a file, of a directory's text files (sorted by path), or, with
    ``path=None``, of the Python standard library's source; as a 1-D int64 tensor of byte values."""
    if path is None:
        root = Path(os.__file__).resolve().parent
        files, where = _files_under(root), f"the standard library ({root})"
    else:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(
                f"--data {path!r} does not exist; give a text file or a directory of them"
            )
        files, where = ([root] if root.is_file() else _files_under(root)), f"--data {path!r}"
    chunks: list[bytes] = []
    total = 0
    for file in files:
        chunks.append(file.read_bytes())
        total += len(chunks[-1])
        if total >= limit:
            break
    blob = b"".join(chunks)[:limit]
    if len(blob) < MIN_BYTES:  # a ConfigError (a ValueError): the launcher shows it in one line
        raise ConfigError(
            f"{where} holds only {len(blob)} bytes of {'/'.join(TEXT_SUFFIXES)} text; need >= {MIN_BYTES}"
        )
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


def split(data: torch.Tensor, eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on the head, evaluate on the tail (never trained on)."""
    cut = int(len(data) * (1 - eval_fraction))
    return data[:cut], data[cut:]


class Windows(Dataset):
    """``length`` windows of ``context`` bytes from non-overlapping slots of ``data``, in a seeded order.

    Items are 1-D int64 tensors of ``context`` bytes; with ``as_dict`` they are
    ``{"input_ids": w, "labels": w}`` with the first label -100 (the form HF Trainer's default collator
    and models expect; the mask, because the Trainer counts labels before the shift, below).
    """

    def __init__(
        self, data: torch.Tensor, context: int, length: int, seed: int, *, as_dict: bool = False
    ) -> None:
        self.slots = len(data) // context
        if self.slots < 1:
            raise ConfigError(f"the data has {len(data)} bytes, fewer than one --context={context} window")
        self.data, self.context, self.length, self.seed, self.as_dict = data, context, length, seed, as_dict
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.slots, generator=gen)
        return self._perms[epoch]

    def __getitem__(self, i: int) -> torch.Tensor | dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        slot = int(self._perm(i // self.slots)[i % self.slots])
        window = self.data[slot * self.context : (slot + 1) * self.context]
        if not self.as_dict:
            return window
        # the Trainer divides the summed loss by its count of labels != -100 (num_items_in_batch), unshifted:
        # the first byte is never a target, so mask it, or every window counts context bytes for its
        # context - 1 targets and the loss and gradients come out scaled by (context - 1) / context
        labels = window.clone()
        labels[0] = -100
        return {"input_ids": window, "labels": labels}


def eval_windows(data: torch.Tensor, context: int, count: int, *, as_dict: bool = False) -> Windows:
    """Up to ``count`` held-out windows spread evenly over ``data`` (the same ones at every evaluation)."""
    ds = Windows(data, context, 0, seed=0, as_dict=as_dict)
    ds.length = min(count, ds.slots)
    ds._perms[0] = torch.linspace(0, ds.slots - 1, ds.length).long()
    return ds
