"""Token files and the batches each rank reads from them.

Sources (``data.path``):
- null: the Python standard library's own .py files (installed packages excluded), byte-level;
  needs no download. Prepared once into a uint16 ``.bin`` in the cache directory.
- a directory: every non-hidden file under it, sorted by path, byte-level (vocab 256); prepared
  into the cache the same way (keyed by the files' names, sizes and modification times).
- a ``.bin`` file: pre-tokenized uint16 token ids, used in place; ``model.vocab_size`` must exceed
  the largest id.

Preparation is safe with many ranks: only each node's local rank 0 writes (to a temporary name,
then ``os.replace``, so a reader never sees half a file, and two nodes sharing a cache directory
write the same bytes to the same name); every rank then waits on a barrier before reading.

Batches: the training tokens are cut into non-overlapping windows of ``seq_len + 1`` tokens, shuffled
by a permutation that depends only on (seed, epoch). Global step s uses windows s*G .. (s+1)*G - 1 of
that order (G = micro_batch * grad_accum * world); rank r takes its contiguous slice of them. The
order is therefore fixed by the seed, and a resumed run continues from the saved window counter.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soap_apps.pretrain.config import ConfigError, DataConfig

CACHE_ENV = "SOAP_DIST_CACHE"
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
BYTE_VOCAB = 256
VOCAB_CHECK_TOKENS = 1 << 24  # ids checked against model.vocab_size: the first 16M of a .bin

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, next-token targets), each (micro_batch, seq_len)


def loss_unit(byte_level: bool) -> str:
    """The unit of a cross-entropy on these tokens: a byte-level corpus's tokens are its bytes."""
    return "nats/byte" if byte_level else "nats/token"


def is_byte_level(path: str | None) -> bool:
    """Whether ``data.path`` is read as bytes (null or a directory) rather than as a .bin of token ids."""
    return path is None or not str(path).endswith(".bin")


def cache_dir(configured: str | None = None) -> Path:
    """``data.cache_dir``, else ``$SOAP_DIST_CACHE``, else ``~/.cache/soap_dist``."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "soap_dist")


def stdlib_root() -> Path:
    return Path(os.path.dirname(os.path.abspath(os.__file__)))


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by path, without installed packages or caches."""
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(stdlib_root()):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(paths)


def text_files(directory: Path) -> list[Path]:
    """Every regular, non-hidden file under ``directory`` (hidden directories skipped), sorted."""
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        paths.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(p for p in paths if p.is_file())


def _fingerprint(root: Path, paths: list[Path]) -> str:
    """Changes whenever a file is added, removed, resized or touched: the cache key of a prepared .bin."""
    h = hashlib.sha256(str(root.resolve()).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def write_tokens(tokens: np.ndarray, out: Path) -> None:
    """Write uint16 ``tokens`` to ``out`` atomically (temporary file in the same directory, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temporaries(out.parent)
    tmp = out.with_name(f".{out.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        tokens.astype(np.uint16).tofile(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def sweep_dead_temporaries(folder: Path) -> None:
    """Remove the temporary files of preparations killed on this host (SIGKILL skips their cleanup):
    each is up to a whole corpus, and the cache is often in a shared home. A file whose process is
    alive (or whose pid was reused) is left alone; other hosts' files are theirs to remove."""
    for tmp in folder.glob(f".*.{socket.gethostname()}.*.tmp"):
        pid = tmp.name.removesuffix(".tmp").rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _bytes_of(paths: list[Path]) -> np.ndarray:
    return np.frombuffer(b"".join(p.read_bytes() for p in paths), dtype=np.uint8)


def prepare_tokens(cfg: DataConfig, *, writer: bool, barrier: Callable[[], None]) -> tuple[Path, bool]:
    """Path of the uint16 token file for ``cfg`` (prepared into the cache if needed), and whether it is
    byte-level. Call on every rank: ``writer`` (each node's local rank 0) prepares, all wait on ``barrier``.
    """
    if cfg.path is None:
        files, root = stdlib_files(), stdlib_root()
        name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{_fingerprint(root, files)}.bin"
    else:
        root = Path(cfg.path).expanduser()
        if root.is_file() and root.suffix == ".bin":
            barrier()  # keep the collective count the same whatever the source
            return root, False
        if not root.is_dir():
            raise ConfigError(
                f"data.path={cfg.path!r} is neither a directory of text files nor a .bin file of uint16 "
                "token ids; set data.path to one of those, or to null for the standard library's source"
            )
        files = text_files(root)
        if not files:
            raise ConfigError(f"data.path={cfg.path!r} holds no (non-hidden) files to read")
        name = f"text-{root.resolve().name}-{_fingerprint(root, files)}.bin"
    out = cache_dir(cfg.cache_dir) / name
    if writer and not out.is_file():
        try:
            write_tokens(_bytes_of(files), out)
        except OSError as error:  # a read-only or full cache directory: name the key that moves it
            where = f"data.cache_dir={cfg.cache_dir!r}" if cfg.cache_dir else f"the token cache {out.parent}"
            raise ConfigError(
                f"{where}: cannot write the prepared tokens {out.name} ({error.strerror or error}); set "
                f"data.cache_dir (or ${CACHE_ENV}) to a writable directory"
            ) from None
    barrier()
    return out, True


@dataclass
class TokenSplits:
    """Training and held-out tokens (uint16 memory maps; the held-out part is the file's tail)."""

    train: np.ndarray
    eval: np.ndarray
    path: Path


def load_splits(
    path: Path, *, eval_fraction: float, seq_len: int, vocab_size: int, byte_level: bool
) -> TokenSplits:
    """Memory-map ``path`` and split off the last ``eval_fraction`` of it.

    Checks that the ids fit ``vocab_size`` (over the first VOCAB_CHECK_TOKENS of a .bin: an id out of
    range would otherwise surface as an opaque indexing error, on GPUs as a device-side assert).
    """
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if byte_level and vocab_size < BYTE_VOCAB:
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for byte-level data; set it to 256")
    if not byte_level and len(tokens):
        top = int(tokens[:VOCAB_CHECK_TOKENS].max())  # a bounded read: .bin files can be many GB
        if top >= vocab_size:
            raise ConfigError(
                f"{path} holds token id {top}, but model.vocab_size={vocab_size}; set model.vocab_size to at "
                f"least {top + 1} (the tokenizer's vocabulary size)"
            )
    n_eval = int(len(tokens) * eval_fraction)
    n_train = len(tokens) - n_eval
    for part, n, fix in (
        ("training", n_train, "use more data"),
        ("held-out", n_eval, "raise data.eval_fraction"),
    ):
        if n < seq_len + 2:
            raise ConfigError(
                f"{path}: the {part} split has {n} tokens, fewer than model.seq_len + 2 = {seq_len + 2}; "
                f"{fix} or lower model.seq_len"
            )
    return TokenSplits(train=tokens[:n_train], eval=tokens[n_train:], path=path)


def _stack(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    chunk = torch.from_numpy(rows)
    return chunk[:, :-1], chunk[:, 1:]


class BatchSampler:
    """This rank's micro-batches for each optimizer step, in an order fixed by the seed (module docstring)."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        micro_batch: int,
        grad_accum: int,
        rank: int,
        world: int,
        seed: int,
    ) -> None:
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.micro_batch, self.grad_accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.n_windows = (len(tokens) - 1) // seq_len
        self.next_window = 0  # global window counter (windows trained so far): the first of the next step
        self._perms: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)}
        return self._perms[epoch]

    def next_step(self) -> list[Batch]:
        """The ``grad_accum`` micro-batches of this rank for the next optimizer step."""
        per_rank = self.micro_batch * self.grad_accum
        first = self.next_window + self.rank * per_rank
        windows = [
            self._order(i // self.n_windows)[i % self.n_windows] for i in range(first, first + per_rank)
        ]
        self.next_window += per_rank * self.world
        starts = np.asarray(windows, dtype=np.int64) * self.seq_len
        return [
            _stack(self.tokens, starts[k : k + self.micro_batch], self.seq_len)
            for k in range(0, per_rank, self.micro_batch)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"next_window": self.next_window, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint; refuses one written for another seed or another data file."""
        for key in ("seed", "n_windows"):
            if state[key] != getattr(self, key):
                raise ConfigError(
                    f"--resume: the checkpoint's data order has {key}={state[key]}, "
                    f"this run {getattr(self, key)}; "
                    "resume with the same train.seed, data.path, data.eval_fraction and model.seq_len"
                )
        self.next_window = int(state["next_window"])


def eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    micro_batch: int,
    grad_accum: int,
    n_batches: int,
    rank: int,
    world: int,
) -> list[Batch]:
    """This rank's share of ``n_batches`` global batches of evenly spaced held-out windows.

    The set depends on the global batch (``micro_batch * grad_accum * world``) only, not on how it is
    split into ranks and micro-batches: runs of one global batch score the same windows, so their
    held-out losses compare (before, the set followed ``micro_batch * world``, and a model trained
    bit for bit alike scored 1.7% apart at world 2). Every rank gets ``n_batches * grad_accum``
    micro-batches, so the mean over ranks is the mean over the set."""
    per_rank = n_batches * grad_accum * micro_batch
    starts = np.linspace(0, len(tokens) - seq_len - 1, per_rank * world).astype(np.int64)
    mine = starts[rank * per_rank : (rank + 1) * per_rank]
    return [_stack(tokens, mine[k : k + micro_batch], seq_len) for k in range(0, len(mine), micro_batch)]
