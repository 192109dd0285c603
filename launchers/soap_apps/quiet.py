"""Narrow filters for library messages that say nothing a user of these launchers can act on.

Each drops one message of one library logger for the duration of one call, and leaves every other
message alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# deepspeed/runtime/engine.py (_do_optimizer_sanity_check) logs this on rank 0 whenever the client
# optimizer is not in its ZERO_SUPPORTED_OPTIMIZERS list, even with zero_allow_untested_optimizer set
# (the setting only turns its assertion off). SOAP under ZeRO is soap_dist.deepspeed's and is tested
# there (tests/test_deepspeed.py), so the banner only alarms.
_DS_LOGGER, _DS_UNTESTED = "DeepSpeed", "You are using ZeRO with an untested optimizer"
# accelerate/utils/other.py (clean_state_dict_for_safetensors) logs this when save_state writes a model
# with tied weights (GPT-2's lm_head.weight is wte.weight) to safetensors: the alias is dropped from the
# file and re-tied on load; the fine-tune tests' resumes retrace the uninterrupted runs bit for bit.
_ACC_LOGGER, _ACC_SHARED = "accelerate.utils.other", "Removed shared tensor"


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def drop_log_message(logger_name: str, text: str) -> Iterator[None]:
    """While the block runs, records of logger ``logger_name`` whose message contains ``text`` are dropped."""
    logger = logging.getLogger(logger_name)
    drop = _DropMessage(text)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def no_untested_optimizer_banner() -> contextlib.AbstractContextManager[None]:
    """Around ``deepspeed.initialize`` (or ``accelerator.prepare`` under DeepSpeed): DeepSpeed's
    "untested optimizer" banner, and nothing else, is dropped."""
    return drop_log_message(_DS_LOGGER, _DS_UNTESTED)


def no_shared_tensor_note() -> contextlib.AbstractContextManager[None]:
    """Around ``accelerator.save_state``: Accelerate's "Removed shared tensor" note about tied weights,
    and nothing else, is dropped."""
    return drop_log_message(_ACC_LOGGER, _ACC_SHARED)


def deepspeed_cpu_without_probe() -> None:
    """On a machine without CUDA, name DeepSpeed's accelerator (its documented ``DS_ACCELERATOR``
    variable) unless the user did, so that DeepSpeed does not probe for one and log "Setting
    accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." on every
    rank. Call it before DeepSpeed is first imported; with a GPU it does nothing."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def no_deprecated_all_gather_warning() -> None:
    """Process-wide, for runs through DeepSpeed: drop torch 2.13's FutureWarnings that
    ``torch.distributed.all_gather_into_tensor`` and ``reduce_scatter_tensor`` are deprecated.
    DeepSpeed 0.19.8 (pinned) calls them from its comm layer (deepspeed/comm/torch.py) at every ZeRO
    step (ZeRO-3: the reduce-scatter at every micro-batch, two lines per rank); the warning names
    torch's own wrapper as its source, so it prints as a stray ``return func(*args, **kwargs)`` line
    inside the progress bar. Nothing a user can change; soap_dist itself calls ``all_gather_single``.
    Every other warning shows."""
    import warnings

    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings(
            "ignore", message=f"`torch.distributed.{name}` is deprecated", category=FutureWarning
        )
