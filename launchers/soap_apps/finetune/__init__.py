"""Fine-tuning with Accelerate (``launchers/finetune.py``; docs/accelerate.md).

``config`` holds the run's flags, ``data`` the byte-level corpus and its windows, ``model`` the
models and the loss, ``train`` the Accelerate loop. Importing this package imports neither
Accelerate nor transformers; the functions that need them import them when called.
"""

from soap_apps.finetune.config import FinetuneConfig, parse_args

__all__ = ["FinetuneConfig", "parse_args"]
