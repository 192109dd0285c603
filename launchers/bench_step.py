"""Step-time benchmark launcher: the same as ``python -m soap_dist.bench`` (see docs/benchmarks.md).

Usage: ``python launchers/bench_step.py --model gpt2-medium [--no-tf32] [--only floor,soap_dist]``.
"""

from __future__ import annotations

from soap_dist.bench.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
