"""Argument checks shared by the benchmark tools, so that a bad value is refused before any work.

A benchmark that fails after minutes of measuring, or with a traceback, wastes the run and hides the
cause. Every refusal here is argparse's own one line, ``error: argument --x: ...`` and exit 2, naming
the flag and the values it takes (as ``python -m soap_dist.plan`` does): the ``type=`` functions run
while argparse reads the command line, and ``refuse`` words a check across flags the same way.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import NoReturn

import torch


def refuse(parser: argparse.ArgumentParser, flag: str, message: str) -> NoReturn:
    """A check that needs several flags, worded as argparse words its own (exit 2)."""
    parser.error(f"argument {flag}: {message}")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (0, -1 or 'x' would fail only deep inside the run)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def int_list(low: int, example: str) -> Callable[[str], list[int]]:
    """An argparse type: a comma list of at least one integer >= ``low``, e.g. ``example``."""

    def parse(text: str) -> list[int]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        try:
            values = [int(part) for part in parts]
        except ValueError:
            values = []
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of integers >= {low}, e.g. {example}; got {text!r}"
            )
        return values

    return parse


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of at least one of ``choices`` (an empty list times nothing)."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            what = f"unknown {', '.join(map(repr, unknown))}" if unknown else f"no name in {text!r}"
            raise argparse.ArgumentTypeError(f"{what}; choose one or more of {','.join(choices)}")
        return names

    return parse


def writable_file(text: str) -> str:
    """An argparse type: a file path that can be written, checked before the run rather than after it."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path, e.g. {text}/out.json")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: the folder {folder} does not exist or is not writable")
    if os.path.exists(text) and not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: the file exists and is not writable")
    return text


def torch_device(text: str) -> str:
    """An argparse type: cpu or cuda[:N] that this torch can use (the timers synchronise only these)."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device ({error}); use cpu or cuda[:N]"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks time cpu or cuda[:N] only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text}: this torch has no usable CUDA (torch {torch.__version__}); use cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} GPUs")
    return text


def make_current(device: torch.device) -> None:
    """Make ``cuda:N`` the current device, so that the timers' events, synchronize, memory stats and
    graph captures (which use the current device) time the GPU the tensors are on. A bare ``cuda`` is
    the current device already (and torch.cuda.set_device refuses a device without an index)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
