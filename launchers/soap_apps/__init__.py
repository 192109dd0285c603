"""The applications built on soap_dist: pre-training (``pretrain``) and fine-tuning (``finetune``).

Not part of the installed library, which needs torch alone: their dependencies are the ``train``
extra (``pip install -e '.[train]'``; fine-tuning adds ``accelerate``, ``--deepspeed`` adds
``deepspeed``). ``launchers/*.py`` import this package from their own directory; tests/conftest.py
puts launchers/ on sys.path.
"""
