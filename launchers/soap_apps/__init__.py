"""The applications built on soap_dist: pre-training (``pretrain``) and fine-tuning (``finetune``),
and the prepared GPU run that measures them (``gpu_suite``, run by launchers/gpu_suite.py).

Not part of the installed library, which needs torch alone: their dependencies are the ``train``
extra (``pip install -e '.[train]'``; fine-tuning adds ``accelerate``, ``--deepspeed`` adds
``deepspeed``). ``launchers/*.py`` import this package from their own directory; tests/conftest.py
puts launchers/ on sys.path.
"""

from importlib.util import find_spec

_TRAIN_EXTRA = {"numpy": "numpy", "tqdm": "tqdm", "yaml": "pyyaml", "matplotlib": "matplotlib"}
_missing = [package for module, package in _TRAIN_EXTRA.items() if find_spec(module) is None]
if _missing:
    raise ModuleNotFoundError(
        f"the applications in launchers/ need {', '.join(_missing)} (the train extra): "
        "pip install -e '.[train]' from the repository root"
    )
