"""Issue 13: the library needs torch alone. ``pip install -e .`` installs torch and nothing else, so no
module under soap_dist/ may import the applications' packages (the ``train`` extra: numpy, yaml, tqdm,
matplotlib) or an integration's (DeepSpeed, Accelerate, transformers) when it is imported.

torch itself imports numpy and tqdm when they are installed, as they are in the test environment, so
the check is on what importing soap_dist adds after ``import torch``. The real check, in a venv with
torch alone, is in the README's install commands; this one keeps new imports from creeping in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_IMPORTED = ("numpy", "yaml", "tqdm", "matplotlib", "PIL", "deepspeed", "accelerate", "transformers")

PROBE = """
import importlib, json, pkgutil, sys
import torch
before = {name.split(".")[0] for name in sys.modules}
import soap_dist, soap_dist.bench, soap_dist.plan
modules = [m.name for m in pkgutil.walk_packages(soap_dist.__path__, "soap_dist.")]
added = {}
for name in modules:
    importlib.import_module(name)
    for top in {m.split(".")[0] for m in sys.modules} - before:
        added.setdefault(top, name)  # the first soap_dist module after whose import it was there
print(json.dumps({"modules": modules, "added": added}))
"""


def test_soap_dist_imports_nothing_beyond_torch():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("soap_dist.bench", "soap_dist.plan", "soap_dist.deepspeed", "soap_dist.optimizer"):
        assert name in result["modules"]
    assert not any(m.startswith(("soap_dist.pretrain", "soap_dist.finetune")) for m in result["modules"])
    leaked = {top: by for top, by in result["added"].items() if top in NOT_IMPORTED}
    assert not leaked, f"imported with soap_dist (package: first module that brought it in): {leaked}"
