"""The HF Trainer route: the same fine-tuning as launchers/finetune.py, with SOAP handed to
``transformers.Trainer`` as ``optimizer_cls_and_kwargs=(soap_dist.SOAP, {...})`` (docs/accelerate.md).

Usage: ``python launchers/finetune_trainer.py --steps 200`` (same flags as launchers/finetune.py;
``--resume latest`` resumes from the newest ``checkpoint-N`` the Trainer wrote in --output-dir).
Bad input (a missing --data or --resume path, --init-from, a used --output-dir, too little data)
ends in one line and exit code 2, as in launchers/finetune.py.
"""

from __future__ import annotations

import sys

from soap_apps.config_loader import ConfigError
from soap_apps.finetune.config import parse_args
from soap_apps.finetune.hf import build_trainer


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, prog="launchers/finetune_trainer.py")
    try:
        trainer = build_trainer(cfg)
    except (ConfigError, FileExistsError) as error:  # bad input: one line, no traceback; exit 2 as for
        # a bad flag (the paths and --output-dir are checked before the model or the data is built)
        print(f"launchers/finetune_trainer.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    resume = True if cfg.resume == "latest" else cfg.resume
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()  # on every rank: evaluation gathers across them
    if trainer.is_world_process_zero():
        print(f"held-out loss: {metrics['eval_loss']:.4f} nats/byte")


if __name__ == "__main__":
    main()
