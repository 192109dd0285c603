"""The two fine-tuning routes, launchers/finetune.py (Accelerate) and finetune_trainer.py (the HF
Trainer), train and evaluate the same: the same windows in the same order, the same loss, and the
same held-out mean. In this process, with AdamW (SOAP would add its own rounding amplification)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from soap_apps.finetune import train
from soap_apps.finetune.config import parse_args
from soap_apps.finetune.hf import build_trainer

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_accelerate_state")]


def test_the_trainer_route_trains_and_evaluates_as_finetune_py(tmp_path):
    """Before: the Trainer shuffled with its own sampler (and over a length that --steps sets), and
    divided the summed loss by context bytes per window for context - 1 targets (63/64 of the loss).
    The held-out mean matches here with the Trainer's own loop too (in one process it trims the
    repeated last batch); its averaging over several processes is checked in tests/test_accelerate.py
    (the Trainer scenarios: 13 windows over 2 ranks)."""
    data = tmp_path / "texts"
    data.mkdir()
    (data / "source.py").write_bytes(Path(argparse.__file__).read_bytes()[:12_000])  # varied bytes
    flags = [
        "--steps", "3", "--batch-size", "4", "--context", "32", "--max-bytes", "12000", "--eval-every", "0",
        "--eval-windows", "13", "--fused", "off", "--threads", "1", "--optimizer", "adamw",
        "--data", str(data),
    ]  # fmt: skip
    rows = train.main([*flags, "--output-dir", str(tmp_path / "accelerate")])
    losses = [r["loss"] for r in rows if "loss" in r]
    held_out = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = parse_args(
        [*flags, "--output-dir", str(tmp_path / "trainer")], prog="launchers/finetune_trainer.py"
    )
    trainer = build_trainer(cfg, disable_tqdm=True)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # (rounded to 4 decimals)
    assert logged == pytest.approx(losses, abs=1e-4), (logged, losses)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(held_out, rel=1e-6)


def test_the_trainer_route_compares_the_processes_when_the_trainer_is_built(tmp_path, monkeypatch):
    """As launchers/finetune.py does before prepare(): in Trainer.__init__ (its Accelerator set up the
    process group), before train() prepares the model and loads a checkpoint, which are collectives
    that processes started otherwise would enter out of step."""
    from soap_apps.config_loader import ConfigError
    from soap_apps.finetune import hf

    seen = []

    def differs(cfg, data, start):
        seen.append((len(data), start))
        raise ConfigError("the processes were started with different settings (lr: ...)")

    monkeypatch.setattr(hf, "check_same_run", differs)
    cfg = parse_args(["--max-bytes", "12000", "--output-dir", str(tmp_path / "trainer")])
    with pytest.raises(ConfigError, match="different settings"):
        build_trainer(cfg, disable_tqdm=True)
    assert seen == [(12000, None)]
