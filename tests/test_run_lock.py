"""One run at a time in a run directory (launchers/soap_apps/run_lock.py): two jobs given the same
--out or --output-dir mixed their metrics and overwrote each other's checkpoints, and fine-tuning's
start-over deleted a live run's metrics; a dead run's lock file must not hold the directory. And a
resume reads the tokens its checkpoints were trained on (resume_check.check_resume_corpus)."""

from __future__ import annotations

import re

import pytest

from soap_apps import run_lock
from soap_apps.config_loader import ConfigError


def test_a_held_directory_is_refused_naming_its_holder_and_freed_after(tmp_path):
    with run_lock.holding(tmp_path, True):
        assert (tmp_path / run_lock.LOCK_FILE).is_file()
        with pytest.raises(
            run_lock.RunDirInUse, match=r"is in use by a run that is still going \(pid \d+ on "
        ):
            with run_lock.holding(tmp_path, True):
                pass
    assert not (tmp_path / run_lock.LOCK_FILE).exists()  # removed at the end
    with run_lock.holding(tmp_path, True):  # and free again
        pass


def test_a_dead_runs_lock_file_holds_nothing(tmp_path):
    (tmp_path / run_lock.LOCK_FILE).write_text(
        "pid 1 on elsewhere, since long ago\n"
    )  # unlocked: its holder died
    with run_lock.holding(tmp_path, True):
        pass


def test_a_lock_taken_on_a_file_just_removed_is_taken_again(tmp_path, monkeypatch):
    """A job that opened the lock file just before its holder removed it at the end locked a removed
    file, and the next job locked a new one: two runs at once (a review's stress test: 6779 of 12021)."""
    import os

    real, calls = run_lock._lock_once, []

    def racing(run_dir):
        handle, problem = real(run_dir)
        if not calls:  # the holder ended between this job's open and its lock, and removed the file
            os.unlink(run_dir / run_lock.LOCK_FILE)
        calls.append(1)
        return handle, problem

    monkeypatch.setattr(run_lock, "_lock_once", racing)
    handle, problem = run_lock._claim(tmp_path)
    assert problem is None and len(calls) == 2 and run_lock._still_there(tmp_path, handle)
    handle.close()


def test_only_the_main_rank_locks_and_every_rank_gets_its_verdict(tmp_path, monkeypatch):
    with run_lock.holding(tmp_path, True):
        with monkeypatch.context() as patch:  # another rank, given rank 0's verdict by the broadcast
            patch.setattr(run_lock, "from_rank0", lambda why: "rank 0 says so")
            with pytest.raises(run_lock.RunDirInUse, match="rank 0 says"):
                with run_lock.holding(tmp_path, False):
                    pass
        with run_lock.holding(tmp_path, False):  # no lock taken, none refused
            pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from pretrain_helpers import temporary_cache

    yield from temporary_cache(tmp_path_factory)


def test_pretraining_into_a_live_runs_directory_is_refused(tmp_path, monkeypatch, cache):
    from pretrain_helpers import SMALL_MODEL, TINY

    from soap_apps.pretrain.config import load_config
    from soap_apps.pretrain.trainer import run

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(TINY, [*SMALL_MODEL, "train.steps=2", "train.eval_every=0"])
    with run_lock.holding(tmp_path, True):  # a run still going there
        for resume in (False, True):  # --resume was the advice of the refusal that came first before
            with pytest.raises(run_lock.RunDirInUse, match="in use by a run that is still going"):
                run(cfg, run_dir=tmp_path, resume=resume)
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written into it
    (tmp_path / run_lock.LOCK_FILE).write_text("pid 1\n")  # a killed run's: not 'already holds a run'
    assert run(cfg, run_dir=tmp_path).step == 2
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


def test_a_resume_on_an_edited_corpus_is_refused(tmp_path, monkeypatch, cache):
    """The corpus at data.path edited between a run's checkpoint and its resume: the resume trained on
    the new tokens, silently (the cache key changed, the data order's checks did not)."""
    from pretrain_helpers import SMALL_MODEL, TINY

    from soap_apps.pretrain.config import ConfigError, load_config
    from soap_apps.pretrain.trainer import run

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "the quick brown fox jumps over the lazy dog. " * 600
    (corpus / "a.txt").write_text(text)
    cfg = load_config(TINY, [*SMALL_MODEL, "train.steps=4", "train.eval_every=0", f"data.path={corpus}"])
    out = tmp_path / "run"
    run(cfg, run_dir=out, stop_after=2)
    (corpus / "a.txt").write_text(text.replace("o", "0"))  # the same size
    with pytest.raises(ConfigError, match=r"the training tokens differ .* \(saved: \d+ tokens, "):
        run(cfg, run_dir=out, resume=True)
    (corpus / "a.txt").write_text(text)  # as it was: resumes
    assert run(cfg, run_dir=out, resume=True).step == 4


def test_a_run_directory_is_listed_alike_by_both_launchers(tmp_path):
    from soap_apps.finetune.checkpoints import check_output_dir
    from soap_apps.pretrain.checkpoint import check_run_dir

    (tmp_path / run_lock.LOCK_FILE).write_text("")
    (tmp_path / "checkpoints").mkdir()
    for i in range(7):
        (tmp_path / f"f{i}").write_text("")
    listed = "(checkpoints/, f0, f1, f2, f3, f4, ...)"  # six names at most, no lock file
    assert run_lock.shown_entries(run_lock.run_entries(tmp_path)) == listed[1:-1]
    with pytest.raises(ConfigError, match=re.escape(listed)):
        check_run_dir(tmp_path, resume=False, backend="ddp")
    with pytest.raises(FileExistsError, match=re.escape(listed)):
        check_output_dir(tmp_path, resume=None)
