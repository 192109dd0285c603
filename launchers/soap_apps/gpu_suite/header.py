"""The summary's header: the card, torch and Python, the commit, the date and the command line.

Without these a table of timings cannot be compared with another run's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys

from soap_apps.gpu_suite.settings import REPO


def header(args: argparse.Namespace) -> list[str]:
    """The summary's first lines: card, torch and Python, commit (dirty or not), date, command."""
    import torch

    if args.smoke:
        card = "CPU (smoke run: CUDA hidden)"
    elif torch.cuda.is_available():
        card = f"{card_name()} (CUDA {torch.version.cuda})"
    else:
        card = "no CUDA device"
    commit = args.commit or _git("rev-parse", "HEAD") or "unknown (no git here; pass --commit)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    if dirty:
        commit += " (with uncommitted changes)"
    return [
        f"card: {card}",
        f"torch {torch.__version__}, python {platform.python_version()}",
        f"commit: {commit}",
        f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"command: `{' '.join(['python3', 'launchers/gpu_suite.py', *sys.argv[1:]])}`",
    ]


def card_name() -> str:
    """The first visible GPU's name, read by nvidia-smi so that this process opens no CUDA context
    beside the parts' (a GPU in exclusive-process mode takes one); torch's reading where that fails."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", visible or "0"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    import torch

    return torch.cuda.get_device_name(0)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
