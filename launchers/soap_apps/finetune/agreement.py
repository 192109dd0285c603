"""Every process of a fine-tuning run must run the same command, read the same corpus and resume the
same checkpoint: checked in one all_gather before the weights or the optimizer load anything; and an
input refused on one process is refused on every one.

``accelerate launch`` on several nodes starts each node with its own command line and its own disk.
A node given another --seed or --lr, one whose Python's standard library (the default corpus) is
another version, or one whose --output-dir holds other checkpoints (node-local disks) trained apart
from the others: each rank loaded its own checkpoint and skipped its own count of batches, and
under DDP the replicas held other weights from there on, silently with AdamW. And a node that
refused its input (no checkpoint to resume there, a used --output-dir) stopped alone, while the
others waited for it in their next collective (with NCCL until its timeout), or stopped with gloo's
"Connection closed by peer". Pre-training checks the same (``soap_apps.pretrain.rank_agreement``);
its wording and its corpus fingerprint serve here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from soap_apps.finetune.config import FinetuneConfig
from soap_apps.pretrain.rank_agreement import (
    described,
    gather,
    raise_any,
    refuse_differences,
    tokens_fingerprint,
)

# flags whose values may differ between nodes: where each keeps its copies (their contents are
# compared instead: the corpus by fingerprint, the checkpoint by the step it resumes), and its CPU threads
LOCAL_FLAGS = ("data", "init_from", "output_dir", "resume", "threads")


def settings(cfg: FinetuneConfig, data: torch.Tensor | None, start: Path | None) -> dict[str, Any]:
    """What must be the same on every process: the flags (but ``LOCAL_FLAGS``), the corpus, the resume."""
    flags = {key: value for key, value in cfg.to_dict().items() if key not in LOCAL_FLAGS}
    corpus = tokens_fingerprint(data.numpy()).replace("tokens", "bytes") if data is not None else None
    return {**flags, "corpus": corpus, "resuming from": start.name if start is not None else None}


def check_same_run(
    cfg: FinetuneConfig,
    data: torch.Tensor | None,
    start: Path | None,
    error: BaseException | None = None,
) -> None:
    """ConfigError on every process when the processes differ in ``settings``, or when one of them
    refused its input (``error``: this process's; then ``data`` may be None); nothing with one."""
    every = gather(
        {"settings": settings(cfg, data, start), "error": None if error is None else described(error)}
    )
    raise_any(error, [e["error"] for e in every])
    refuse_differences(
        [e["settings"] for e in every],
        "processes",
        "every node must run the same command on the same corpus, and --output-dir must be one directory "
        "every process sees (a file system the nodes share)",
    )
