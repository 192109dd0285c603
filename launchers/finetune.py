"""Fine-tune a byte-level causal LM with SOAP (or AdamW) under Accelerate: DDP, FSDP2 or DeepSpeed.

Usage (from the repository root; see docs/accelerate.md):
``accelerate launch --config_file configs/accelerate/ddp.yaml launchers/finetune.py --steps 200``.
Plain ``python launchers/finetune.py`` trains in one process. ``--help`` lists the flags.
"""

from __future__ import annotations

from soap_apps.finetune.train import main
from soap_apps.process_exit import finish, finish_as

if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:  # bad input (2), an interrupt (130, 143): also without the teardown
        finish_as(stop)
    finish(0)
