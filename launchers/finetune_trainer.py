"""The HF Trainer route: the same fine-tuning as launchers/finetune.py, with SOAP handed to
``transformers.Trainer`` as ``optimizer_cls_and_kwargs=(soap_dist.SOAP, {...})`` (docs/accelerate.md).

Usage: ``python launchers/finetune_trainer.py --steps 200`` (same flags as launchers/finetune.py).
It writes the Trainer's ``checkpoint-N/`` directories into --output-dir, every --save-every steps and
at the end; ``--resume latest`` resumes from the newest complete one, after checking that the flags
match the settings it was saved with. Bad input (a missing --data or --resume path, --init-from, a
used or unwritable --output-dir, changed settings on resume, too little data) ends in one line and
exit code 2, as in launchers/finetune.py. An interrupt (Ctrl-C, SIGTERM) ends in one line too: what
was kept and the command that continues the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from soap_apps import run_lock
from soap_apps.config_loader import ConfigError
from soap_apps.finetune.config import parse_args
from soap_apps.finetune.hf import build_trainer, newest_checkpoint, output_dir
from soap_apps.finetune.resume import NothingToTrain, report, script_path, stopped
from soap_apps.pretrain.resume_check import interrupt_in, sigterm_as_interrupt
from soap_apps.process_exit import run_and_finish

SCRIPT = "launchers/finetune_trainer.py"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, prog=SCRIPT)
    argv = sys.argv[1:] if argv is None else argv
    out, rank0 = Path(output_dir(cfg)), os.environ.get("RANK", "0") == "0"
    trainer: Any = None
    with sigterm_as_interrupt():
        try:
            trainer = build_trainer(cfg)
            with run_lock.holding(out, trainer.is_world_process_zero()):
                # build_trainer resolved --resume (and said what it skipped) once, into the arguments
                trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
                metrics = trainer.evaluate()  # on every rank: evaluation gathers across them
        except (ConfigError, FileExistsError) as error:  # bad input: one line, no traceback; exit 2 as
            # for a bad flag (the paths and --output-dir are checked before the model or the data)
            print(f"{SCRIPT}: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except NothingToTrain as done:  # a finished run resumed
            if rank0:
                print(f"{SCRIPT}: {done}")
            return
        except BaseException as error:  # Ctrl-C, or SIGTERM: say what was kept and how to go on
            if (stop := interrupt_in(error)) is None:
                raise
            step = trainer.state.global_step if trainer is not None else None
            newest = newest_checkpoint(out) if out.is_dir() else None
            interrupted = stopped(stop, step, cfg.steps, newest, rank0)
            held = out.is_dir() and any(out.iterdir())
            restart = f"first delete {out}: it holds no complete checkpoint" if held else "nothing was saved"
            report(interrupted, script_path(SCRIPT), argv, out, newest is not None, restart)
            raise SystemExit(interrupted.exit_code) from None
    if trainer.is_world_process_zero():
        print(f"held-out loss: {metrics['eval_loss']:.4f} nats/byte")


if __name__ == "__main__":
    run_and_finish(main)
