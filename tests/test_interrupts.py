"""Ctrl-C or SIGTERM while a checkpoint is written (soap_apps.pretrain.resume_check.interrupts_held):
the save and the pruning finish and the interrupt is raised right after, so that the checkpoint due
at that step is kept whole; the same signal a second time stops at once; a signal that would not
raise an interrupt there (SIGINT ignored, SIGTERM's default) is left as it is.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pretrain_helpers import LAUNCHER, SMALL_MODEL, temporary_cache

from soap_apps.pretrain import checkpoint, resume_check
from soap_apps.pretrain.resume_check import Terminated, interrupts_held, sigterm_as_interrupt


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """SIGINT raising KeyboardInterrupt, as in a foreground run (a background job starts ignoring it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_interrupt_waits_for_the_block_and_is_raised_after_it(ctrl_c, capfd):
    finished = []
    with pytest.raises(KeyboardInterrupt) as raised:
        with interrupts_held("the checkpoint of step 4", "prog"):
            os.kill(os.getpid(), signal.SIGINT)
            finished.append("the save")
    assert finished == ["the save"] and not isinstance(raised.value, Terminated)
    assert "prog: SIGINT during the checkpoint of step 4: finishing it first" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_signal_stops_at_once_and_the_quiet_ranks_say_nothing(ctrl_c, capfd, monkeypatch):
    monkeypatch.setattr(resume_check, "COPIES_WITHIN_S", 0.0)  # the second comes later than this
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held("the checkpoint", None):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            finished.append("the save")
    assert finished == [] and capfd.readouterr().err == ""


def test_copies_of_the_signal_right_after_it_do_not_cut_the_block_short(ctrl_c):
    """The deepspeed launcher's ranks get the terminal's SIGINT, then the launcher's SIGTERM."""
    finished = []
    with pytest.raises(KeyboardInterrupt) as raised:
        with sigterm_as_interrupt(), interrupts_held("the checkpoint", None):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            finished.append("the save")
    assert finished == ["the save"] and not isinstance(raised.value, Terminated)


def test_a_block_that_fails_after_the_signal_raises_the_interrupt(ctrl_c):
    """A peer that stopped at once leaves this rank's save to fail: the run still ends as interrupted."""
    with pytest.raises(KeyboardInterrupt) as raised:
        with interrupts_held("the checkpoint", None):
            os.kill(os.getpid(), signal.SIGINT)
            raise RuntimeError("Connection closed by peer")
    assert isinstance(raised.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError):  # without a signal, the error itself
        with interrupts_held("the checkpoint", None):
            raise RuntimeError("disk full")


def test_sigterm_is_held_only_where_it_would_raise(ctrl_c):
    finished = []
    with pytest.raises(Terminated):
        with sigterm_as_interrupt(), interrupts_held("the checkpoint", None):
            os.kill(os.getpid(), signal.SIGTERM)
            finished.append("the save")
    assert finished == ["the save"]
    # outside sigterm_as_interrupt SIGTERM keeps whatever handler it had
    before = signal.getsignal(signal.SIGTERM)
    with interrupts_held("the checkpoint", None):
        assert signal.getsignal(signal.SIGTERM) is before
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_held("the checkpoint", None):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored, as before: nothing is raised after the block
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Iterator[Path]:
    yield from temporary_cache(tmp_path_factory)


def test_ctrl_c_during_a_save_keeps_that_checkpoint(
    tmp_path, texts, cache, one_process, ctrl_c, monkeypatch, capsys
):
    """The launcher in this process, Ctrl-C arriving as step 4's checkpoint starts: step_4 is written
    whole, the run exits 130 naming it, and ``--resume`` continues from it."""
    real_save = checkpoint.save

    def save_interrupted_at_step_4(path: Path, *args, **kwargs) -> None:
        if path.name == "step_4":
            os.kill(os.getpid(), signal.SIGINT)
        real_save(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save_interrupted_at_step_4)
    monkeypatch.setenv("SOAP_DIST_CACHE", str(cache))
    sys.path.insert(0, str(LAUNCHER.parent))
    try:
        launcher = __import__("pretrain")
    finally:
        sys.path.pop(0)
    out = tmp_path / "run"
    sets = [*SMALL_MODEL, "data.eval_fraction=0.1", "train.steps=8", "train.checkpoint_every=2"]
    args = [*(a for s in sets for a in ("--set", s)), "--data", str(texts), "--out", str(out)]
    assert launcher.main(args) == 130
    err = capsys.readouterr().err
    assert "pretrain: SIGINT during the checkpoint of step 4: finishing it first" in err
    assert f"the newest complete checkpoint is {checkpoint.step_dir(out, 4)};" in err
    assert checkpoint.checkpoint_steps(out) == [2, 4]
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert launcher.main([*args, "--resume", "--stop-after", "5"]) == 0
