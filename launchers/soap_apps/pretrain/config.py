"""The pre-training configuration: dataclasses that map one-to-one onto the YAML files.

Why dataclasses: every key has one place where its type, default and meaning are written, so a
typo in a YAML file or a ``--set`` override is an error that names the key, never a silently
ignored setting. ``load_config(path, overrides)`` reads a YAML file, applies ``section.key=value``
overrides (values parsed as YAML: ``train.steps=20``, ``optim.betas=[0.9,0.95]``,
``optim.block_size=null``) and validates the result. Reading values onto the dataclasses, and the
error messages, are ``soap_apps.config_loader``'s, shared with fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from soap_apps.config_loader import ConfigError, parse_override, read_mapping, require, set_field

OPTIMIZERS = ("soap", "adamw")
PARALLEL_MODES = ("fsdp2", "ddp", "hsdp", "single")
OWNER_SCOPES = ("world", "shard_group")  # SOAP's owner_scope
SCHEDULES = ("all", "staggered")  # SOAP's refresh_schedule


@dataclass
class ModelConfig:
    """The GPT decoder (soap_apps.pretrain.model.GPT)."""

    vocab_size: int = 256  # 256 for byte-level data; the tokenizer's size for a pre-tokenized .bin
    seq_len: int = 128  # context length in tokens
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    bias: bool = True  # biases in the linear layers and LayerNorms


@dataclass
class DataConfig:
    """Where tokens come from. path: null = the Python standard library's .py files, byte-level."""

    path: str | None = None  # a directory of text files (byte-level) or a uint16 .bin of token ids
    eval_fraction: float = 0.02  # the last this-fraction of the tokens is held out for eval
    cache_dir: str | None = None  # prepared .bin files (default: $SOAP_DIST_CACHE or ~/.cache/soap_dist)


@dataclass
class OptimConfig:
    """The optimizer. Weight decay applies to 2-D weights only (optim.param_groups)."""

    name: str = "soap"  # "soap" or "adamw"
    lr: float = 3e-3  # peak learning rate (after warmup)
    betas: tuple[float, float] = (0.95, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0  # max global gradient norm; null = no clipping
    # SOAP only (ignored by adamw); defaults are SOAP's. All of them reach SOAP (soap_apps.soap_options)
    shampoo_beta: float = -1.0  # EMA rate of the factors; negative: betas[1]
    precondition_frequency: int = 10
    max_precond_dim: int = 10000  # a dimension larger than this gets no factor
    merge_dims: bool = False
    precondition_1d: bool = False  # full factors for 1-D tensors (biases, norm gains)
    normalize_grads: bool = False
    block_size: int | None = None  # see docs/design.md section 6: set it under fsdp2/hsdp
    refresh_delay: int = 0
    fused: bool | None = None  # SOAP's torch.compile'd elementwise step (null: on CUDA only, false: eager)
    refresh_schedule: str = "all"  # "staggered": each matrix refreshes at its own phase of the k steps
    basis_dtype: str | None = None  # null: the factors' dtype; "bfloat16": half the bases' memory
    async_refresh: bool | None = None  # null: on CUDA with refresh_delay >= 1, refresh beside the next step
    owner_scope: str = "world"  # hsdp under placement owner: "world" (state 1/W) or "shard_group"


@dataclass
class ScheduleConfig:
    """Learning rate: linear warmup from 0, then cosine decay to min_lr_ratio * lr at train.steps."""

    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    """The loop. Global batch = micro_batch * grad_accum * world size sequences of model.seq_len."""

    steps: int = 300  # optimizer steps
    micro_batch: int = 16  # sequences per rank per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # weights and data order
    log_every: int = 10  # steps between metrics records (loss averaged over them)
    eval_every: int = 100  # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 8  # global batches of held-out windows per evaluation
    checkpoint_every: int = 100  # steps between DCP checkpoints (0: only at the end)
    keep_checkpoints: int | None = 2  # newest checkpoints kept (null: keep all)
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU, which always runs fp32)
    threads: int | None = None  # torch threads per process (null: CPU cores / processes on this node)


@dataclass
class ParallelConfig:
    """How the model is spread over ranks (ignored with one process or under --deepspeed)."""

    mode: str = "fsdp2"  # "fsdp2", "ddp", "hsdp" or "single" (single needs world size 1)
    hsdp_shard_size: int | None = None  # ranks per shard group under hsdp (null: ranks per node)
    sync_every_micro_batch: bool = False  # true: all-reduce gradients on every micro-batch


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain YAML-able dict (tuples as lists)."""
        out = dataclasses.asdict(self)
        for section in out.values():
            for key, value in section.items():
                if isinstance(value, tuple):
                    section[key] = list(value)
        return out


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _set(config: Config, key: str, value: Any, where: str) -> None:
    section_name, _, name = key.partition(".")
    sections = _sections()
    if section_name not in sections or not name:
        raise ConfigError(
            f"unknown config key {key!r} ({where}); keys are section.name with section one of "
            f"{', '.join(sections)}"
        )
    set_field(getattr(config, section_name), name, value, key=key, where=where, scope=repr(section_name))


def _validate(cfg: Config) -> None:
    m, t, o, s = cfg.model, cfg.train, cfg.optim, cfg.schedule
    for key in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio"):
        require(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), ">= 1")
    require(
        m.d_model % m.n_heads == 0, "model.d_model", m.d_model, f"a multiple of model.n_heads ({m.n_heads})"
    )
    require(0 < cfg.data.eval_fraction < 1, "data.eval_fraction", cfg.data.eval_fraction, "in (0, 1)")
    require(o.name in OPTIMIZERS, "optim.name", o.name, " or ".join(map(repr, OPTIMIZERS)))
    require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "a finite number > 0")
    require(all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "two numbers in [0, 1)")
    require(
        o.weight_decay >= 0 and math.isfinite(o.weight_decay),
        "optim.weight_decay",
        o.weight_decay,
        "a finite number >= 0",
    )
    require(
        o.grad_clip is None or (o.grad_clip > 0 and math.isfinite(o.grad_clip)),
        "optim.grad_clip",
        o.grad_clip,
        "a finite number > 0, or null (no clipping)",
    )
    require(o.precondition_frequency >= 1, "optim.precondition_frequency", o.precondition_frequency, ">= 1")
    require(o.block_size is None or o.block_size >= 1, "optim.block_size", o.block_size, ">= 1 or null")
    require(o.max_precond_dim >= 1, "optim.max_precond_dim", o.max_precond_dim, ">= 1")
    require(o.owner_scope in OWNER_SCOPES, "optim.owner_scope", o.owner_scope, "'world' or 'shard_group'")
    # SOAP's own checks, here so that a bad value is a one-line config error naming the optim.* key
    require(o.eps > 0 and math.isfinite(o.eps), "optim.eps", o.eps, "a finite number > 0")
    require(o.shampoo_beta < 1, "optim.shampoo_beta", o.shampoo_beta, "< 1 (negative: betas[1])")
    require(o.refresh_delay >= 0, "optim.refresh_delay", o.refresh_delay, ">= 0")
    require(
        o.refresh_delay < o.precondition_frequency,
        "optim.refresh_delay",
        o.refresh_delay,
        f"< optim.precondition_frequency ({o.precondition_frequency})",
    )
    schedule = o.refresh_schedule
    require(schedule in SCHEDULES, "optim.refresh_schedule", schedule, "'all' or 'staggered'")
    require(
        not (o.async_refresh and o.refresh_delay == 0),
        "optim.async_refresh",
        o.async_refresh,
        "null or false with optim.refresh_delay=0 (set refresh_delay: 1 to use it)",
    )
    require(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, ">= 0")
    require(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", s.min_lr_ratio, "in [0, 1]")
    for key in ("steps", "micro_batch", "grad_accum", "log_every", "eval_batches"):
        require(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), ">= 1")
    for key in ("eval_every", "checkpoint_every"):
        require(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), ">= 0 (0: only at the end)")
    require(
        t.keep_checkpoints is None or t.keep_checkpoints >= 1,
        "train.keep_checkpoints",
        t.keep_checkpoints,
        ">= 1 or null",
    )
    require(t.threads is None or t.threads >= 1, "train.threads", t.threads, ">= 1 or null")
    require(
        cfg.parallel.mode in PARALLEL_MODES,
        "parallel.mode",
        cfg.parallel.mode,
        " or ".join(map(repr, PARALLEL_MODES)),
    )
    shard = cfg.parallel.hsdp_shard_size
    require(shard is None or shard >= 1, "parallel.hsdp_shard_size", shard, ">= 1 or null")


def load_config(
    path: str | Path | None = None, overrides: list[str | tuple[str, Any]] | None = None
) -> Config:
    """The defaults, updated by the YAML file at ``path`` (if any), then by ``overrides``; validated.

    An override is ``"section.key=value"`` (value parsed as YAML) or a ``(key, value)`` pair taken as is.
    """
    cfg = Config()
    if path is not None:
        raw = read_mapping(path, examples="configs/pretrain/", top="sections")
        for section_name, section in raw.items():
            if not isinstance(section, dict):
                raise ConfigError(f"{path}: section {section_name!r} must be a mapping, got {section!r}")
            for name, value in section.items():
                _set(cfg, f"{section_name}.{name}", value, f"in {path}")
    for item in overrides or []:
        key, value = parse_override(item) if isinstance(item, str) else item
        _set(cfg, key, value, f"from the override {item!r}")
    _validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[tuple[str, Any]], where: str) -> Config:
    """A validated copy of ``cfg`` with the ``(key, value)`` pairs set; errors name the key and ``where``."""
    out = copy.deepcopy(cfg)
    for key, value in overrides:
        _set(out, key, value, where)
    _validate(out)
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved configuration (defaults, file and overrides merged) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
