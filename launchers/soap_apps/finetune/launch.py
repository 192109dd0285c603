"""What ``accelerate launch`` set up, read before and into an Accelerator.

``accelerate launch`` describes the run in environment variables (ACCELERATE_USE_FSDP, FSDP_VERSION,
ACCELERATE_USE_DEEPSPEED, WORLD_SIZE, ...). ``check_launch`` refuses, before any work, the setups
under which fine-tuning would silently train something else; ``make_accelerator`` builds the
Accelerator for the rest; ``backend_name`` names the setup for the default --output-dir. Both
fine-tuning routes (launchers/finetune.py and the HF Trainer's) read it here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from soap_apps.finetune.config import FinetuneConfig
from soap_apps.quiet import deepspeed_cpu_without_probe, no_deprecated_all_gather_warning


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def check_launch(cfg: FinetuneConfig, cuda: bool | None = None) -> None:
    """Refuse, before any work, the Accelerate setups under which this run would be wrong.

    ``accelerate launch`` describes the setup in environment variables (ACCELERATE_USE_FSDP,
    FSDP_VERSION, ACCELERATE_USE_DEEPSPEED); they are read here, before an Accelerator exists.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return
    if os.environ.get("FSDP_VERSION", "1") != "2" and cfg.optimizer == "soap":
        raise ValueError(
            "the accelerate config selects FSDP version 1 (fsdp_config.fsdp_version: 1), which hands the "
            "optimizer flattened 1-D shards that SOAP cannot precondition: set fsdp_version: 2 "
            "(see configs/accelerate/fsdp2.yaml)"
        )
    if not cuda:
        raise RuntimeError(
            "the accelerate config selects FSDP, but no CUDA device is visible: on CPU Accelerate 1.15 "
            "ignores the FSDP plugin (with cpu=True it runs DDP; without it every process trains alone). "
            "On CPU use configs/accelerate/ddp.yaml or deepspeed_zero2.yaml, or launchers/pretrain.py "
            "(torchrun + fully_shard) for FSDP2"
        )


def make_accelerator(cfg: FinetuneConfig, **kwargs: Any) -> Any:
    """The Accelerator for what ``accelerate launch`` set up; ``kwargs`` go to Accelerator as given.

    Without CUDA, when launched with several processes: a gloo process group; ``cpu=True`` for DDP
    (without it Accelerate treats every process as a run of its own); never ``cpu=True`` under
    DeepSpeed (Accelerate would drop the DeepSpeed plugin), whose shm op build is skipped too (it
    serves only inference).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    check_launch(cfg)
    cuda = torch.cuda.is_available()
    deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    options: dict[str, Any] = dict(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision
    )
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by accelerate launch / torchrun
    if deepspeed:
        deepspeed_cpu_without_probe()  # before DeepSpeed's first import (soap_apps/quiet.py)
        no_deprecated_all_gather_warning()
    if not cuda and launched:
        options["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        options["cpu"] = not deepspeed
    if deepspeed and not cuda:  # one process too: DeepSpeed sets up its communication all the same
        skip_deepspeed_shm_build()
    if deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        # reads the JSON the accelerate config names; fills its "gradient_clipping": "auto" with ours
        # (0.0 turns clipping off; left to Accelerate, "auto" would become 1.0)
        options["deepspeed_plugin"] = DeepSpeedPlugin(gradient_clipping=float(cfg.grad_clip))
    options.update(kwargs)
    return Accelerator(**options)


def skip_deepspeed_shm_build() -> None:
    """On CPU, skip DeepSpeed's one-time shm-op JIT build (tens of seconds; it serves only inference)."""
    try:
        from soap_dist.deepspeed import disable_shm_comm
    except ImportError:  # the DeepSpeed plugin module is optional
        return
    disable_shm_comm()


def backend_name(accelerator: Any | None = None) -> str:
    """What runs the fine-tuning, for the default --output-dir: ``single``, ``ddp``, ``fsdp2`` (or
    ``fsdp1``), ``deepspeed-zero<stage>``; from the Accelerator's distributed type, or without one
    (the Trainer route, before the Trainer builds its own) from what ``accelerate launch`` set."""
    if accelerator is None:
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
            config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
            if stage is None and config_file and os.path.isfile(config_file):
                with open(config_file) as fh:  # the stage is often only in the JSON the YAML names
                    stage = json.load(fh).get("zero_optimization", {}).get("stage")
            return f"deepspeed-zero{stage}" if stage is not None else "deepspeed"
        if _env_flag("ACCELERATE_USE_FSDP"):
            return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
        return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    state = accelerator.state
    if kind == "DEEPSPEED":
        return f"deepspeed-zero{state.deepspeed_plugin.zero_stage}"
    if kind == "FSDP":
        return f"fsdp{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"
    return {"NO": "single", "MULTI_CPU": "ddp", "MULTI_GPU": "ddp"}.get(kind, kind.lower())
