"""launchers/demo.py takes its settings through the applications' config loader (issue 13)."""

from __future__ import annotations

import pytest
from demo import DemoConfig, parse_args  # launchers/ is on sys.path (tests/conftest.py)


def test_demo_flags_and_set_go_through_the_config_loader(capsys):
    assert parse_args([]) == DemoConfig()
    assert parse_args(["--steps", "5", "--batch-size", "4", "--seed", "1", "--threads", "1"]) == DemoConfig(
        steps=5, batch_size=4, seed=1, threads=1
    )
    got = parse_args(["--set", "steps=7", "--set", "batch_size=2"])  # --set overrides the defaults
    assert (got.steps, got.batch_size, got.seed) == (7, 2, 0)
    assert parse_args(["--set", "steps=7", "--steps", "9"]).steps == 9  # an explicit flag wins
    for argv, message in [
        (
            ["--set", "stepz=3"],
            "error: unknown config key 'stepz' (from the override 'stepz=3'); the keys are:",
        ),
        (["--set", "steps=many"], "error: steps must be an integer, got 'many'"),  # the loader's words
        (["--set", "steps"], "error: an override must look like key=value (e.g. steps=20), got 'steps'"),
        (["--steps", "0"], "error: steps must be >= 1, got 0"),  # pre-training's range-check wording
    ]:
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
