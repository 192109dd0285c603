"""Fine-tuning checkpoints: written whole or not at all, and found by ``--resume latest``.

A checkpoint is ``accelerator.save_state`` into ``checkpoints/step_N.partial``, which rank 0 renames
to ``checkpoints/step_N`` once every rank has written its part and it has added ``MARKER`` (the step,
the settings and the Accelerate setup the checkpoint was saved with; ``resume.check_resume`` reads
it). A run stopped during a save thus leaves a ``.partial`` directory, never a ``step_N`` that no
resume can load. The layout and its listing are pre-training's (``soap_apps.pretrain.checkpoint``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from soap_apps.config_loader import ConfigError
from soap_apps.pretrain import checkpoint
from soap_apps.pretrain.trainer import check_out_path
from soap_apps.run_lock import run_entries, shown_entries

CHECKPOINTS = checkpoint.CHECKPOINTS
MARKER = "finetune_checkpoint.json"
# what Accelerate writes last (the registered Progress): a complete checkpoint saved before MARKER existed
LEGACY_MARKER = "custom_checkpoint_0.pkl"
PARTIAL = ".partial"
METRICS = "metrics.jsonl"
# what a fresh run may find in --output-dir and start over on, when no checkpoint in it is complete
LEFTOVERS = frozenset({METRICS, CHECKPOINTS})


def note(text: str) -> None:
    """A note on stderr from rank 0 only (``RANK`` is set by accelerate launch; unset: one process)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"finetune: note: {text}", file=sys.stderr, flush=True)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() or (path / LEGACY_MARKER).is_file()


def complete_steps(out: Path) -> list[int]:
    """Steps of the checkpoints under ``out`` a resume can load, ascending."""
    found = set(checkpoint.checkpoint_steps(out, MARKER)) | set(
        checkpoint.checkpoint_steps(out, LEGACY_MARKER)
    )
    return sorted(found)


def newest_complete(out: Path) -> Path | None:
    steps = complete_steps(out)
    return checkpoint.step_dir(out, steps[-1]) if steps else None


def _incomplete(out: Path) -> list[str]:
    """The ``step_N`` directories under ``out`` without their marker (cut short by an older version)."""
    done = set(complete_steps(out))
    return [f"step_{s}" for s in checkpoint.steps_present(out) if s not in done]


def _latest(out: Path) -> Path:
    """The newest complete checkpoint under ``out``, with a note naming those skipped as incomplete;
    FileNotFoundError naming the flag where there is none."""
    newest, skipped = newest_complete(out), _incomplete(out)
    newer = [name for name in skipped if newest is None or int(name[5:]) > int(newest.name[5:])]
    if newest is not None:
        if newer:
            skipped_text = ", ".join(newer)
            note(
                f"--resume latest: skipping {skipped_text} under {out / CHECKPOINTS} (incomplete: a save was "
                f"cut short); resuming from {newest}"
            )
        return newest
    what = (
        f"complete checkpoints/step_N (only the incomplete {', '.join(skipped)})"
        if skipped
        else "checkpoints/step_N"
    )
    raise FileNotFoundError(
        f"--resume latest: no {what} under --output-dir {str(out)!r}; leave --resume out to start the run "
        "again there"
    )


def resume_dir(cfg: Any) -> Path | None:
    """``--resume DIR`` (a complete checkpoint), or with ``--resume latest`` the newest complete
    ``checkpoints/step_N`` in --output-dir; FileNotFoundError naming the flag where there is none."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        return _latest(Path(cfg.output_dir))
    path = Path(cfg.resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {cfg.resume!r} is not a directory written by save_state")
    if not is_complete(path):
        raise FileNotFoundError(
            f"--resume {cfg.resume!r} is not a complete checkpoint (no {MARKER}: its save was cut short); "
            "pass --resume latest to take the newest complete one"
        )
    return path


def check_writable(out: Path) -> None:
    """Pre-training's check of its run directory (``check_out_path``), in this launcher's flag name:
    ConfigError when ``out`` is a file or cannot be created; creates it (empty) when missing."""
    try:
        check_out_path(out)
    except ConfigError as error:
        raise ConfigError(str(error).replace("--out ", "--output-dir ")) from None


def _only_leftovers(out: Path, held: list[Path], leftovers: frozenset[str]) -> bool:
    return all(p.name in leftovers for p in held) and not complete_steps(out)


def check_output_dir(out: Path, resume: str | None, leftovers: frozenset[str] = frozenset()) -> bool:
    """Refuse to start a fresh run in a non-empty --output-dir: its metrics.jsonl would hold two runs
    and its checkpoints/ would mix them (a ZeRO-2 run once wrote into a DDP run's directory). True
    when it holds only ``leftovers`` and no complete checkpoint (a run interrupted before its first
    save): nothing there can be resumed, so a fresh run starts over in it (``start_over``)."""
    if resume is not None or not out.is_dir():
        return False
    held = run_entries(out)
    if not held:
        return False
    if leftovers and _only_leftovers(out, held, leftovers):
        return True
    raise FileExistsError(
        f"--output-dir {str(out)!r} already holds a run ({shown_entries(held)}); pass --resume latest (or "
        "--resume DIR) to continue that run, or another --output-dir to start a new one"
    )


def start_over(out: Path) -> None:
    """Clear what an interrupted run left without a checkpoint (rank 0, before the fresh run writes)."""
    note(
        f"--output-dir {str(out)!r} holds a run interrupted before its first checkpoint; starting again there"
    )
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    (out / METRICS).unlink(missing_ok=True)


def remove_partials(out: Path) -> None:
    """Delete the ``step_N.partial`` directories of saves that were cut short (rank 0): none can load."""
    root = out / CHECKPOINTS
    for path in sorted(root.glob(f"step_*{PARTIAL}")) if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def read_marker(path: Path) -> dict[str, Any] | None:
    """What ``save`` recorded with the checkpoint at ``path``; None for one saved without it."""
    marker = path / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def save(accelerator: Any, out: Path, step: int, record: dict[str, Any]) -> Path:
    """``accelerator.save_state`` as one atomic checkpoint ``checkpoints/step_<step>`` (a collective:
    every rank calls it). ``record`` (the settings and the setup) goes into its MARKER."""
    final = checkpoint.step_dir(out, step)
    partial = final.with_name(final.name + PARTIAL)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # a save of this step cut short before
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every rank's files are in place
    if accelerator.is_main_process:
        (partial / MARKER).write_text(json.dumps({"step": step, **record}, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # an incomplete one an older version left
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final
