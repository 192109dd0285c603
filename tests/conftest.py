"""Shared helpers: the oracle and launchers/ on sys.path, seeded problems, a driver for SOAP vs the oracle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# the applications (soap_apps: pre-training, fine-tuning) live in launchers/, outside the installed
# library; launchers/*.py find them as their own directory, the tests through this line
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "launchers"))
torch.set_num_threads(1)  # the test problems are tiny: threads only add contention on a 2-core CI machine

from oracle import OracleSOAP  # noqa: E402

from soap_dist import SOAP  # noqa: E402


def gradient_stream(shapes, steps: int, seed: int = 1):
    """Fresh full-rank float64 gradients for every call (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes] for _ in range(steps)]


def run_against_oracle(
    groups,
    *,
    steps=50,
    dtype=torch.float64,
    factor_dtype=torch.float64,
    seed=0,
    qr_method="cholesky_qr2",
    **common,
):
    """Run SOAP (one optimizer, several groups) and one oracle per group on the same gradients.

    ``groups`` is a list of (shapes, group_kwargs). Returns the largest relative error over params.
    """
    gen = torch.Generator().manual_seed(seed)
    inits = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes] for shapes, _ in groups]
    oracles = [
        OracleSOAP([w.clone() for w in ws], **{**common, **kw})
        for ws, (_, kw) in zip(inits, groups, strict=True)
    ]
    params = [[torch.nn.Parameter(w.to(dtype)) for w in ws] for ws in inits]
    opt = SOAP(
        [{"params": ps, **kw} for ps, (_, kw) in zip(params, groups, strict=True)],
        factor_dtype=factor_dtype,
        qr_method=qr_method,
        **common,
    )
    all_shapes = [s for shapes, _ in groups for s in shapes]
    for grads in gradient_stream(all_shapes, steps, seed + 1):
        k = 0
        for oracle, ps in zip(oracles, params, strict=True):
            oracle.step(grads[k : k + len(ps)])
            for p in ps:
                p.grad = grads[k].to(dtype)
                k += 1
        opt.step()
    errors = [
        ((p.detach().double() - w).norm() / w.norm()).item()
        for oracle, ps in zip(oracles, params, strict=True)
        for p, w in zip(ps, oracle.params, strict=True)
    ]
    return max(errors)


# ----- the spawned gloo worlds of tests/dist_scenarios.py, shared by every test module -----
@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dcp"))


@pytest.fixture(scope="session")
def world2(checkpoint_dir):
    import dist_scenarios

    return dist_scenarios.run_world(2, checkpoint_dir)


@pytest.fixture(scope="session")
def world4(checkpoint_dir, world2):  # loads the checkpoints world 2 wrote
    import dist_scenarios

    return dist_scenarios.run_world(4, checkpoint_dir)


def result(ranks, name):
    """A scenario's result on rank 0, after checking that no rank raised."""
    for r, res in enumerate(ranks):
        assert "exception" not in res[name], f"rank {r} raised:\n{res[name]['exception']}"
    return ranks[0][name]


# ----- the launchers' small runs (tests/test_launcher_errors.py, tests/test_resume_check.py) -----


@pytest.fixture
def texts(tmp_path) -> Path:
    """A small byte-level corpus (no standard-library scan)."""
    path = tmp_path / "texts"
    path.mkdir()
    (path / "a.txt").write_text("hello soap " * 400)
    return path


@pytest.fixture
def one_process(monkeypatch) -> None:
    """No torchrun variables: the launcher runs as one process."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fresh_accelerate_state(one_process):
    """Fine-tuning runs in this process build an Accelerator, a process-wide singleton state: each
    test starts without one and leaves none behind (accelerate imported here only)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
