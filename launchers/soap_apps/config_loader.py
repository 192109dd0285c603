"""The configuration loader of both applications: YAML values and ``key=value`` overrides onto
dataclass fields, with one set of error messages.

Pre-training (``soap_apps.pretrain.config``: sections, ``--set section.key=value``) and fine-tuning
(``soap_apps.finetune.config``: one flat dataclass, ``--config FILE.yaml`` and ``--set key=value``)
both go through ``set_field``, so a typo in a key or a value of the wrong type fails the same way in
both, naming the key, where it came from and what it accepts::

    unknown config key 'train.warmup' (in run.yaml); the keys of 'train' are: steps, micro_batch, ...
    optim.lr must be a number, got 'fast'
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and what it accepts."""


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, tuple[float, float], X | None), or ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        return coerce(value, inner[0], key)
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise ConfigError(f"{key} must be a list of {len(items)} numbers, got {value!r}")
        return tuple(coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items, strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in the caller, not in the input


def set_field(obj: Any, name: str, value: Any, *, key: str, where: str, scope: str | None = None) -> None:
    """Set dataclass field ``name`` of ``obj`` to ``value`` coerced to the field's type.

    ``key`` names the setting in messages (``train.steps``, or ``steps`` for a flat config),
    ``where`` says where the value came from (``in run.yaml``, ``from the override 'x=1'``) and
    ``scope`` which group of keys ``name`` was looked up in (``'train'``; None: the whole config).
    """
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        of = f" of {scope}" if scope else ""
        raise ConfigError(f"unknown config key {key!r} ({where}); the keys{of} are: {', '.join(hints)}")
    setattr(obj, name, coerce(value, hints[name], key))


def require(ok: bool, key: str, value: Any, what: str) -> None:
    """ConfigError ``{key} must be {what}, got {value!r}`` unless ``ok``: the range checks of both
    applications (``optim.lr must be > 0, got 0.0``)."""
    if not ok:
        raise ConfigError(f"{key} must be {what}, got {value!r}")


def add_override_flag(parser: argparse.ArgumentParser, metavar: str, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` of every application (collected in ``args.overrides``,
    each parsed later by ``parse_override``)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)


def parse_override(
    text: str, form: str = "section.key=value", example: str = "train.steps=20"
) -> tuple[str, Any]:
    """``"train.steps=20"`` -> ``("train.steps", 20)``; the value is parsed as YAML (empty: None)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"an override must look like {form} (e.g. {example}), got {text!r}")
    if not raw.strip():
        return key.strip(), None
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).replace("\n", " ")
        raise ConfigError(
            f"the override {text!r}: its value {raw!r} is not valid YAML ({problem}); "
            "quote a string, write a list as [a, b]"
        ) from None


def read_mapping(path: str | Path, *, examples: str, top: str) -> dict[str, Any]:
    """The YAML file at ``path`` as a dict (an empty file: {}); ConfigError when it is missing or its
    top level is not a mapping. ``examples`` says where example files are, ``top`` what the top
    level maps (``sections``, ``keys``)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file (see {examples})")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (see {examples} for examples)")
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {str(path)!r} is not a YAML file: byte {error.start} is not UTF-8 text "
            f"(see {examples} for examples)"
        ) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {_yaml_problem(error, text)} "
            f"(see {examples} for examples)"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {top}, got {type(raw).__name__}")
    return raw


def _yaml_problem(error: yaml.YAMLError, text: str) -> str:
    """What PyYAML found wrong, on one line: the problem, where, and that line of ``text`` (or, when
    that line is blank, the line where the unfinished construct began)."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem is None or mark is None:
        return " ".join(str(error).split())
    lines = text.splitlines()

    def shown(line: int) -> str:
        content = lines[line].rstrip() if line < len(lines) else ""
        return f": {content[:80] + (' ...' if len(content) > 80 else '')!r}" if content.strip() else ""

    message = f"{problem} at line {mark.line + 1}, column {mark.column + 1}{shown(mark.line)}"
    context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and start is not None and start.line != mark.line:
        message += f" ({context} at line {start.line + 1}{shown(start.line)})"
    return message
