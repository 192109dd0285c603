"""The fine-tuning run's settings: one dataclass, its command line, its YAML file, and its checks.

Every field is one ``--flag`` (underscores become dashes); ``parse_args`` builds the parser from the
dataclass so the two cannot drift apart. The same fields, by their names, are the keys of a flat
YAML file (``--config FILE.yaml``) and of ``--set key=value`` overrides, read by pre-training's
loader (``soap_apps.config_loader``, with its error messages); the file, then the overrides, then
the explicit flags decide a value. Bad values fail here, before any process group or model exists,
with a message naming the key or flag and the fix.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soap_apps.config_loader import (
    ConfigError,
    add_override_flag,
    parse_override,
    read_mapping,
    require,
    set_field,
)

OPTIMIZERS = ("soap", "adamw")
MODELS = ("gpt2-tiny",)
MIXED_PRECISION = ("no", "bf16", "fp16")
# YAML reads on/off/no as booleans; these string keys take the word back (fused: off, mixed_precision: no)
_YAML_WORDS = {"fused": {True: "on", False: "off"}, "mixed_precision": {False: "no"}}


@dataclass
class FinetuneConfig:
    """What to train, on what, with which optimizer, and where to write. Defaults: a 2-minute CPU run."""

    # model and data
    model: str = field(default="gpt2-tiny", metadata={"help": f"model preset, one of {MODELS}"})
    init_from: str | None = field(
        default=None,
        metadata={"help": "a pre-training export dir (runs/X/final) to start from instead of --model"},
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "a text file or a directory of .txt/.py/.md/.rst files (read in path order), as bytes "
            "(default: the Python standard library's own source)"
        },
    )
    max_bytes: int = field(default=1_000_000, metadata={"help": "read at most this many bytes of --data"})
    eval_fraction: float = field(default=0.1, metadata={"help": "held-out tail of the data, in (0, 0.5]"})
    context: int = field(default=128, metadata={"help": "bytes per training window"})
    # schedule
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "windows per process per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at lr * this"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0: no clipping)"})
    # optimizer
    optimizer: str = field(default="soap", metadata={"help": f"one of {OPTIMIZERS}"})
    beta1: float = field(default=0.95, metadata={"help": "Adam beta1 (SOAP's default 0.95)"})
    beta2: float = field(default=0.95, metadata={"help": "Adam beta2 (SOAP's default 0.95)"})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    weight_decay: float = field(default=0.01, metadata={"help": "decoupled weight decay"})
    shampoo_beta: float = field(default=-1.0, metadata={"help": "SOAP: factor EMA rate (<0: beta2)"})
    precondition_frequency: int = field(default=10, metadata={"help": "SOAP: refresh bases every k steps"})
    max_precond_dim: int = field(default=10000, metadata={"help": "SOAP: larger dims get no factor"})
    block_size: int | None = field(default=None, metadata={"help": "SOAP: row-block size (FSDP2)"})
    refresh_delay: int = field(default=0, metadata={"help": "SOAP: install bases this many steps late"})
    merge_dims: bool = field(default=False, metadata={"help": "SOAP: merge small dims"})
    precondition_1d: bool = field(default=False, metadata={"help": "SOAP: full factors for 1-D tensors"})
    normalize_grads: bool = field(default=False, metadata={"help": "SOAP: RMS-normalize updates"})
    fused: str = field(default="auto", metadata={"help": "SOAP: torch.compile the Adam work: auto|on|off"})
    # bookkeeping
    seed: int = field(default=0, metadata={"help": "seed for weights and data order"})
    mixed_precision: str | None = field(
        default=None, metadata={"help": f"one of {MIXED_PRECISION} (default: the accelerate config's)"}
    )
    eval_every: int = field(default=50, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_windows: int = field(default=256, metadata={"help": "held-out windows per evaluation"})
    save_every: int = field(
        default=0,
        metadata={"help": "save a checkpoints/step_N every N steps, and at the end (0: at the end only)"},
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "metrics.jsonl and checkpoints/; new or empty unless --resume, or left by a run "
            "interrupted before its first checkpoint (default: runs/finetune-<backend>, backend single, "
            "ddp, fsdp2 or deepspeed-zero<stage>)"
        },
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "a checkpoints/step_N dir to resume from, or 'latest': the newest complete one in "
            "--output-dir; needed to write into a non-empty --output-dir"
        },
    )
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads per process"})

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first bad key and what it accepts, in
        pre-training's words (``steps must be >= 1, got 0``)."""

        def need(ok: bool, name: str, what: str) -> None:
            require(ok, name, getattr(self, name), what)

        need(self.optimizer in OPTIMIZERS, "optimizer", " or ".join(map(repr, OPTIMIZERS)))
        need(self.model in MODELS, "model", " or ".join(map(repr, MODELS)) + " (or --init-from DIR)")
        need(self.fused in ("auto", "on", "off"), "fused", "'auto', 'on' or 'off'")
        need(
            self.mixed_precision is None or self.mixed_precision in MIXED_PRECISION,
            "mixed_precision",
            " or ".join(map(repr, MIXED_PRECISION)) + " or null",
        )
        for name in ("steps", "batch_size", "grad_accum", "context", "eval_windows", "max_bytes"):
            need(getattr(self, name) >= 1, name, ">= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "refresh_delay"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(self.context >= 2, "context", ">= 2 (a window predicts its bytes 2..context)")
        need(0 < self.eval_fraction <= 0.5, "eval_fraction", "in (0, 0.5]")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite number > 0")
        need(0 <= self.beta1 < 1, "beta1", "in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "in [0, 1)")
        need(self.eps > 0 and math.isfinite(self.eps), "eps", "a finite number > 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(
            self.grad_clip >= 0 and math.isfinite(self.grad_clip),
            "grad_clip",
            "a finite number >= 0 (0: none)",
        )
        need(
            self.weight_decay >= 0 and math.isfinite(self.weight_decay),
            "weight_decay",
            "a finite number >= 0",
        )
        need(self.threads is None or self.threads >= 1, "threads", ">= 1 or null")
        need(self.block_size is None or self.block_size >= 1, "block_size", ">= 1 or null")
        # SOAP's own checks, here so that a bad value fails before any model is built, naming the flag
        need(self.shampoo_beta < 1, "shampoo_beta", "< 1 (negative: --beta2)")
        need(self.precondition_frequency >= 1, "precondition_frequency", ">= 1")
        need(self.max_precond_dim >= 0, "max_precond_dim", ">= 0")
        need(
            self.refresh_delay < self.precondition_frequency,
            "refresh_delay",
            f"< precondition_frequency ({self.precondition_frequency})",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _set(cfg: FinetuneConfig, key: str, value: Any, where: str) -> None:
    if isinstance(value, bool) and key in _YAML_WORDS:
        value = _YAML_WORDS[key].get(value, value)
    set_field(cfg, key, value, key=key, where=where)


def load_config(
    path: str | Path | None = None,
    overrides: list[str | tuple[str, Any]] | None = None,
    *,
    base: FinetuneConfig | None = None,
    validate: bool = True,
) -> FinetuneConfig:
    """``base`` (default: the defaults), updated by the flat YAML file at ``path`` (if any), then by
    ``overrides``: ``"key=value"`` (value parsed as YAML) or ``(key, value)`` pairs taken as is.

    Unknown keys and values of the wrong type raise pre-training's ConfigError messages.
    """
    cfg = copy.deepcopy(base) if base is not None else FinetuneConfig()
    if path is not None:
        for key, value in read_mapping(path, examples="configs/finetune/", top="keys").items():
            _set(cfg, str(key), value, f"in {path}")
    for item in overrides or []:
        key, value = parse_override(item, "key=value", "steps=20") if isinstance(item, str) else item
        _set(cfg, key, value, f"from the override {item!r}")
    if validate:
        cfg.validate()
    return cfg


def _parse_type(f: dataclasses.Field) -> Any:
    """The argparse type of a field from its annotation string (``from __future__`` keeps them strings)."""
    base = str(f.type).replace(" | None", "")
    return {"int": int, "float": float, "str": str}[base]


class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each help, except where the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


# the HF Trainer route writes its own layout: the Trainer's checkpoint-N/ directories, no metrics.jsonl
TRAINER_HELP = {
    "save_every": "save a checkpoint-N every N steps, and at the end (0: at the end only)",
    "output_dir": "the Trainer's checkpoint-N/ directories; new or empty unless --resume (default: "
    "runs/finetune-trainer-<backend>, backend single, ddp or deepspeed-zero<stage>)",
    "resume": "a checkpoint-N dir to resume from, or 'latest': the newest complete one in --output-dir; "
    "needed to write into a non-empty --output-dir",
}
ROUTE_HELP = {"launchers/finetune_trainer.py": TRAINER_HELP}


def build_parser(prog: str = "launchers/finetune.py") -> argparse.ArgumentParser:
    """One flag per FinetuneConfig field, with its default in the help (the route's own words where
    ``ROUTE_HELP`` has them)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a byte-level causal LM with SOAP (or AdamW) under Accelerate "
        "(DDP, FSDP2 or DeepSpeed; see docs/accelerate.md).",
        formatter_class=_DefaultsOnce,
    )
    helps = ROUTE_HELP.get(prog, {})
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="a flat YAML file of these settings by name (steps: 200, batch_size: 8, ...); "
        "explicit flags win over it (see configs/finetune/)",
    )
    add_override_flag(
        p,
        "KEY=VALUE",
        "set one key, e.g. --set steps=20 (repeatable; value parsed as YAML); applied after --config, "
        "before the explicit flags",
    )
    for f in dataclasses.fields(FinetuneConfig):
        flag, text = "--" + f.name.replace("_", "-"), helps.get(f.name, f.metadata["help"])
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            p.add_argument(flag, type=_parse_type(f), default=f.default, help=text)
    return p


def parse_args(argv: list[str] | None = None, prog: str = "launchers/finetune.py") -> FinetuneConfig:
    """Flags -> a validated FinetuneConfig; a bad value exits with argparse's usage and the reason,
    under ``prog``'s name.

    ``--config`` and ``--set`` become the parser's defaults, so an explicit flag wins over both.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides, validate=False)
    except ConfigError as err:
        parser.error(str(err))
    parser.set_defaults(**base.to_dict())
    args = vars(parser.parse_args(argv))
    cfg = FinetuneConfig(**{f.name: args[f.name] for f in dataclasses.fields(FinetuneConfig)})
    try:
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))
    return cfg
