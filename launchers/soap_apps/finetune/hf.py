"""The HF Trainer route: ``transformers.Trainer(..., optimizer_cls_and_kwargs=(SOAP, kwargs))``.

The Trainer builds the optimizer itself, after it has placed (and, under FSDP2, sharded) the model:
that is why SOAP goes in as a class plus keyword arguments rather than as an instance. Two things
the Trainer does with it that a user should know (docs/accelerate.md):

- it passes two param groups, ``weight_decay=args.weight_decay`` for matrices and 0.0 for biases
  and norms, which override the ``weight_decay`` in the kwargs;
- its learning-rate schedule scales the kwargs' ``lr`` (``args.learning_rate`` is not used for
  the optimizer), so both are set to the same ``--lr`` here.

The schedule is the one of both applications (``soap_apps.schedule.lr_at``, warmup then cosine to
``--min-lr-ratio``), not Hugging Face's ``cosine_with_min_lr``: ``SharedScheduleTrainer`` builds a
``LambdaLR`` from it, so the Trainer's step ``s`` (0-based) gets the launcher's lr of step ``s``.

The Trainer saves a ``checkpoint-N`` every --save-every steps and at the end (0: at the end only, as
on the other route), each with the settings it was saved with (``marker_callback``), which
``--resume`` checks as the other route does (``resume.check_resume``).

What it changes so that both routes train and evaluate the same: the dataset's own order
(``train_sampling_strategy="sequential"``), labels whose first byte is masked (the Trainer counts the
targets before the shift), and the held-out mean over windows (``evaluation_loop``).

Only transformers models fit this route (the Trainer calls ``model(input_ids=..., labels=...)``
and reads ``.loss``); ``--init-from`` exports go through ``launchers/finetune.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from soap_apps.config_loader import ConfigError
from soap_apps.finetune.agreement import check_same_run
from soap_apps.finetune.checkpoints import MARKER, check_output_dir, check_writable, note, read_marker
from soap_apps.finetune.config import FinetuneConfig
from soap_apps.finetune.data import Windows, eval_windows, load_bytes, split
from soap_apps.finetune.launch import backend_name, skip_deepspeed_shm_build
from soap_apps.finetune.model import build_gpt2
from soap_apps.finetune.resume import check_resume
from soap_apps.finetune.train import check_inputs, evaluate, lr_at, soap_kwargs
from soap_dist import SOAP
from soap_dist.integrations.hf_trainer import save_callback


def output_dir(cfg: FinetuneConfig) -> str:
    """--output-dir, by default runs/finetune-trainer-<backend> (apart from launchers/finetune.py's)."""
    return cfg.output_dir or f"runs/finetune-trainer-{backend_name()}"


TRAINER_STATE = "trainer_state.json"  # what the Trainer writes last into a checkpoint-N


def _checkpoint_steps(out: Path) -> list[int]:
    """The N of every ``checkpoint-N`` directory in ``out``, ascending."""
    found = [p.name.removeprefix("checkpoint-") for p in out.glob("checkpoint-*") if p.is_dir()]
    return sorted(int(n) for n in found if n.isdigit())


def newest_checkpoint(out: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``out`` (with its trainer_state.json); None without one."""
    complete = [n for n in _checkpoint_steps(out) if (out / f"checkpoint-{n}" / TRAINER_STATE).is_file()]
    return out / f"checkpoint-{complete[-1]}" if complete else None


def trainer_resume(cfg: FinetuneConfig, out: Path) -> Path | None:
    """The checkpoint ``trainer.train(resume_from_checkpoint=...)`` will load: ``--resume DIR``, or
    with ``--resume latest`` the newest complete ``checkpoint-N`` the Trainer wrote in ``out`` (newer
    ones a save left incomplete are skipped with a note); FileNotFoundError naming the flag where
    there is none."""
    if cfg.resume is None:
        return None
    if cfg.resume != "latest":
        path = Path(cfg.resume)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--resume {cfg.resume!r} is not a directory; give a checkpoint-N directory the Trainer "
                "wrote, or --resume latest"
            )
        if not (path / TRAINER_STATE).is_file():  # the Trainer writes it last: a save cut short
            raise FileNotFoundError(
                f"--resume {cfg.resume!r} is not a complete checkpoint (no {TRAINER_STATE}: its save was "
                "cut short); give another checkpoint-N, or --resume latest"
            )
        return path
    last = newest_checkpoint(out) if out.is_dir() else None
    if last is None:
        cut = [f"checkpoint-{n}" for n in _checkpoint_steps(out)] if out.is_dir() else []
        raise FileNotFoundError(
            f"--resume latest: no complete checkpoint-N under --output-dir {str(out)!r}"
            + (
                f" (only {', '.join(cut)}, whose save was cut short): delete that directory to start the run "
                "again, or give another --output-dir"
                if cut
                else "; drop --resume to start a new run, or pass the --output-dir of the run to continue"
            )
        )
    if skipped := [f"checkpoint-{n}" for n in _checkpoint_steps(out) if n > int(last.name[11:])]:
        note(
            f"--resume latest: skipping {', '.join(skipped)} (incomplete: a save was cut short); "
            f"resuming from {last}"
        )
    return last


def trainer_setup() -> dict[str, Any]:
    """What the Trainer's checkpoint files depend on besides the flags (``train.setup``'s counterpart,
    read from what accelerate launch set: the Trainer builds its Accelerator later)."""
    return {"backend": backend_name(), "world": int(os.environ.get("WORLD_SIZE", "1"))}


def same_run_callback(cfg: FinetuneConfig, data: torch.Tensor, start: Path | None) -> Any:
    """A TrainerCallback that runs ``agreement.check_same_run`` when the Trainer is built: its
    Accelerator has set up the process group by then (not yet when ``build_trainer`` checks its
    inputs), and nothing that depends on the settings has run (``train()`` prepares the model, loads
    the checkpoint and the optimizer's state, all collectives, later)."""
    from transformers import TrainerCallback

    class SameRun(TrainerCallback):
        def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            check_same_run(cfg, data, start)

    return SameRun()


def marker_callback(cfg: FinetuneConfig) -> Any:
    """A TrainerCallback that records the settings in each checkpoint-N the Trainer saved (rank 0),
    as launchers/finetune.py does in its checkpoints, for ``check_resume``."""
    from transformers import TrainerCallback

    record = {"config": cfg.to_dict(), "setup": trainer_setup()}

    class RecordSettings(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and path.is_dir():
                (path / MARKER).write_text(json.dumps({"step": state.global_step, **record}, indent=1) + "\n")

    return RecordSettings()


def check_trainer_resume(cfg: FinetuneConfig, start: Path) -> None:
    """``resume.check_resume`` for a checkpoint-N: its recorded settings, or (saved without them) the
    step in its trainer_state.json."""
    marker = read_marker(start)
    if marker is None and (start / TRAINER_STATE).is_file():
        marker = {"step": json.loads((start / TRAINER_STATE).read_text()).get("global_step", 0)}
    check_resume(cfg, start, marker, trainer_setup())


def shared_lr_factor(cfg: FinetuneConfig) -> Callable[[int], float]:
    """``LambdaLR``'s factor for ``cfg``: the shared schedule over ``--lr`` (LambdaLR multiplies the
    optimizer's base lr, which is ``--lr``), at the Trainer's 0-based step."""
    return lambda step: lr_at(cfg, step) / cfg.lr


def shared_schedule_trainer(cfg: FinetuneConfig) -> type:
    """A ``transformers.Trainer`` subclass whose scheduler is the shared schedule of ``cfg``."""
    from transformers import Trainer

    class SharedScheduleTrainer(Trainer):
        def create_scheduler(
            self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
        ) -> torch.optim.lr_scheduler.LRScheduler:
            if self.lr_scheduler is None:
                opt = optimizer if optimizer is not None else self.optimizer
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, shared_lr_factor(cfg))
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def evaluation_loop(
            self,
            dataloader: Any,
            description: str,
            prediction_loss_only: bool | None = None,
            ignore_keys: list[str] | None = None,
            metric_key_prefix: str = "eval",
        ) -> Any:
            """The held-out loss as launchers/finetune.py computes it: per-window losses, gathered with
            ``gather_for_metrics``, which drops the windows Accelerate repeats to even out the last batch
            across processes. (The Trainer's own loop gathers one mean per batch: a last batch padded
            with repeated windows then counts them, so the loss changed with world size and batch size.)
            Before ``train()`` has prepared the model, the Trainer's own loop, which prepares it (and
            so, with several processes, its own mean), as with ``nn.DataParallel``."""
            if not self.accelerator._models:
                return super().evaluation_loop(
                    dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
                )
            from transformers.trainer_utils import EvalLoopOutput

            model = self._wrap_model(self.model, training=False)  # (its forward autocasts if mixed)
            ids = (self._prepare_inputs(inputs)["input_ids"] for inputs in dataloader)
            metrics = {f"{metric_key_prefix}_loss": evaluate(model, ids, self.accelerator)}
            return EvalLoopOutput(
                predictions=None, label_ids=None, metrics=metrics, num_samples=len(dataloader.dataset)
            )

    return SharedScheduleTrainer


def training_arguments(cfg: FinetuneConfig, **overrides: Any) -> Any:
    """TrainingArguments equivalent to the launcher's flags (clipping, evaluation; the lr schedule is
    SharedScheduleTrainer's)."""
    from transformers import TrainingArguments

    args: dict[str, Any] = dict(
        output_dir=output_dir(cfg),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2,
        adam_epsilon=cfg.eps,
        max_grad_norm=cfg.grad_clip,
        # no lr_scheduler_type / warmup_steps: SharedScheduleTrainer.create_scheduler uses the shared one
        logging_steps=1,
        eval_strategy="steps" if cfg.eval_every else "no",
        eval_steps=cfg.eval_every or None,
        # every --save-every steps and at the end, as launchers/finetune.py does (0: at the end only)
        save_strategy="steps",
        save_steps=cfg.save_every or cfg.steps,
        seed=cfg.seed,
        # the dataset's own seeded order, as on launchers/finetune.py: the default RandomSampler permutes
        # range(len(dataset)), and that length (steps x global batch) changes with --steps on --resume
        train_sampling_strategy="sequential",
        report_to=[],
        # like launchers/finetune.py: never use_cpu under DeepSpeed (Accelerate would drop its plugin)
        use_cpu=not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true",
    )
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args["ddp_backend"] = "gloo"  # only when launched: a backend without a launcher has no group
    if cfg.mixed_precision in ("bf16", "fp16"):
        args[cfg.mixed_precision] = True
    args.update(overrides)
    return TrainingArguments(**args)


def build_trainer(cfg: FinetuneConfig, **overrides: Any) -> Any:
    """A Trainer for ``cfg``: gpt2-tiny on the byte windows, SOAP through ``optimizer_cls_and_kwargs``
    (``--optimizer adamw``: the Trainer's own torch AdamW), the shared lr schedule. ``overrides`` go
    to TrainingArguments. Bad input (see ``launchers/finetune_trainer.py``) fails first, before the
    model or the data: ConfigError, or FileExistsError for a used --output-dir."""
    cfg.validate()
    if cfg.init_from:
        raise ConfigError(
            "--init-from is not supported by the Trainer route (the export is not a transformers model); "
            "use launchers/finetune.py --init-from DIR"
        )
    out = Path(overrides.get("output_dir") or output_dir(cfg))
    check_output_dir(out, cfg.resume)
    check_writable(out)
    start = check_inputs(cfg, lambda c: trainer_resume(c, out))  # --data, --resume: the other route's check
    if start is not None:
        check_trainer_resume(cfg, start)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        skip_deepspeed_shm_build()
    torch.manual_seed(cfg.seed)
    model = build_gpt2(cfg.model, cfg.context)
    data = load_bytes(cfg.data, cfg.max_bytes)
    train_ids, eval_ids = split(data, cfg.eval_fraction)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    length = cfg.steps * cfg.batch_size * cfg.grad_accum * world
    train_ds = Windows(train_ids, cfg.context, length, cfg.seed, as_dict=True)
    eval_ds = eval_windows(eval_ids, cfg.context, cfg.eval_windows, as_dict=True)
    optimizer: dict[str, Any] = {"callbacks": [marker_callback(cfg), same_run_callback(cfg, data, start)]}
    if cfg.optimizer == "soap":
        optimizer["optimizer_cls_and_kwargs"] = (SOAP, soap_kwargs(cfg))
        # the Trainer calls state_dict() on the saving rank only; SOAP's is a collective under DDP
        optimizer["callbacks"].append(save_callback())
    else:
        overrides.setdefault("optim", "adamw_torch")
    # the checkpoint resolved above, for launchers/finetune_trainer.py's train() (not used by the Trainer)
    overrides.setdefault("resume_from_checkpoint", None if start is None else str(start))
    return shared_schedule_trainer(cfg)(
        model=model,
        args=training_arguments(cfg, **overrides),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        **optimizer,
    )
