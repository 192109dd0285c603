"""Fine-tune a byte-level causal LM with SOAP (or AdamW) under Accelerate: DDP, FSDP2 or DeepSpeed.

Usage (from the repository root; see docs/accelerate.md):
``accelerate launch --config_file configs/accelerate/ddp.yaml launchers/finetune.py --steps 200``.
Plain ``python launchers/finetune.py`` trains in one process. ``--help`` lists the flags.
"""

from __future__ import annotations

from soap_apps.finetune.train import main
from soap_apps.process_exit import run_and_finish

if __name__ == "__main__":
    run_and_finish(main)
