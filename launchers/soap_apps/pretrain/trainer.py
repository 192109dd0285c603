"""The pre-training loop, for any backend (FSDP2, DDP, HSDP or one process; or DeepSpeed).

One step reads top to bottom: set the scheduled lr, run the micro-batches (gradients synchronised
on the last one only), clip, step, zero the gradients. The loop itself knows nothing of the
parallelism: a backend (``torch_backend.TorchBackend``, or ``ds_backend.DeepSpeedBackend`` under
--deepspeed) does the steps, evaluation, checkpoints and the export. A training loss (mean over
ranks) that is not finite stops the loop on every rank at the same step, before the next evaluation,
checkpoint or export (``NonFiniteLoss``); it is checked where the loss is logged, from the logged
mean, and with one small all_reduce at an evaluation or checkpoint step that falls between records.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from soap_apps import run_lock
from soap_apps.jsonl import read_records
from soap_apps.pretrain import checkpoint, data, parallel, rank_agreement
from soap_apps.pretrain.config import Config, ConfigError, save_config
from soap_apps.pretrain.metrics import Metrics
from soap_apps.pretrain.model import GPT, export
from soap_apps.pretrain.parallel import DistEnv
from soap_apps.pretrain.resume_check import (
    CORPUS_FILE,
    Progress,
    check_resume_config,
    check_resume_corpus,
    check_stop_after,
    interrupt_in,
    interrupts_held,
)
from soap_apps.pretrain.torch_backend import Backend, TorchBackend
from soap_apps.schedule import lr_at


@dataclass
class RunResult:
    """What a run ended with (rank 0's view; the losses are averaged over ranks)."""

    step: int
    train_loss: float
    eval_loss: float
    seconds: float
    run_dir: Path
    exported: Path | None


@dataclass
class _Data:
    splits: data.TokenSplits
    byte_level: bool
    sampler: data.BatchSampler
    eval_set: list[data.Batch]


def _load_data(cfg: Config, env: DistEnv) -> _Data:
    """Prepare (once per node) and map the tokens; this rank's sampler and evaluation batches."""
    t, seq_len = cfg.train, cfg.model.seq_len
    token_file, byte_level = data.prepare_tokens(
        cfg.data, writer=env.local_rank == 0, barrier=lambda: parallel.barrier(env)
    )
    splits = data.load_splits(
        token_file,
        eval_fraction=cfg.data.eval_fraction,
        seq_len=seq_len,
        vocab_size=cfg.model.vocab_size,
        byte_level=byte_level,
    )
    sampler = data.BatchSampler(
        splits.train,
        seq_len=seq_len,
        micro_batch=t.micro_batch,
        grad_accum=t.grad_accum,
        rank=env.rank,
        world=env.world,
        seed=t.seed,
    )
    eval_set = data.eval_batches(
        splits.eval,
        seq_len=seq_len,
        micro_batch=t.micro_batch,
        grad_accum=t.grad_accum,
        n_batches=t.eval_batches,
        rank=env.rank,
        world=env.world,
    )
    return _Data(splits, byte_level, sampler, eval_set)


def backend_name(cfg: Config, world: int, deepspeed_config: str | None = None) -> str:
    """What trains the run, as it appears in default run directories and the plot title: the
    parallel mode (``single`` with one process), or ``deepspeed-<JSON name>`` under --deepspeed."""
    if deepspeed_config is not None:
        return f"deepspeed-{Path(deepspeed_config).stem}"
    return cfg.parallel.mode if world > 1 else "single"


def check_out_path(run_dir: Path) -> None:
    """Make sure ``run_dir`` can be the run directory, before anything else happens: ConfigError when
    it exists and is not a directory, or cannot be created (a parent is a file, no permission, ...).
    Creates it (empty) when it is missing, on every rank (harmless: mkdir with exist_ok)."""
    try:
        if run_dir.exists() or run_dir.is_symlink():
            if not run_dir.is_dir():
                raise ConfigError(
                    f"--out {run_dir} exists and is not a directory; pass --out a new or empty directory"
                )
            if not os.access(run_dir, os.W_OK | os.X_OK):
                raise ConfigError(f"--out {run_dir}: the directory is not writable")
            return
        parent = Path(os.path.abspath(run_dir)).parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"--out {run_dir} cannot be created: {parent} is a file, not a directory")
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # no permission, a read-only or special file system, ...
        raise ConfigError(f"--out {run_dir} cannot be created: {error.strerror or error}") from None


class NonFiniteLoss(RuntimeError):
    """The training loss (the mean over ranks) is NaN or infinite; raised on every rank at the same
    step, after which nothing is saved or exported. Rank 0 has printed the message already."""


class _LossWatch:
    """Each step's training loss, kept on the device (no host sync per step) until ``first_bad``
    averages them over ranks: every rank sees the same means, so every rank decides the same."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self._steps: list[int] = []
        self._losses: list[torch.Tensor] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self._steps.append(step)
        self._losses.append(loss.detach().float().reshape(()))

    def first_bad(self, logged_mean: float | None = None) -> tuple[int, float] | None:
        """The first step since the previous call whose loss is not finite, with that loss; every
        rank calls it at the same steps (it may be a collective). ``logged_mean``: the metrics' mean
        over the steps since their previous record, when they wrote one at this step (the same on
        every rank); it covers every step since the previous call, so a finite one settles it with
        no reduction of its own."""
        if not self._losses:
            return None
        if logged_mean is not None and math.isfinite(logged_mean):
            self._steps, self._losses = [], []
            return None
        means = parallel.all_reduce_mean(torch.stack(self._losses), self.env).tolist()
        steps, self._steps, self._losses = self._steps, [], []
        return next(((s, m) for s, m in zip(steps, means, strict=True) if not math.isfinite(m)), None)


def _non_finite_message(
    cfg: Config, run_dir: Path, bad: tuple[int, float], found_at: int, last_saved: int | None
) -> str:
    step, loss = bad
    seen = f" (found at step {found_at})" if found_at != step else ""
    if last_saved is None:
        saved = "no checkpoint was written before it"
    else:
        saved = f"the last checkpoint, from before it, is {checkpoint.step_dir(run_dir, last_saved)}"
    return (
        f"the training loss is {loss} at step {step}{seen}; stopped, and no model was exported; "
        f"{saved}. Lower optim.lr (now {cfg.optim.lr:g}) or check the data "
        f"(data.path: {cfg.data.path or 'the standard library'})"
    )


def _soap_placement(backend: Backend) -> str | None:
    """The placement SOAP runs under the torch backend (``placement="auto"`` picks it at the first
    step: owner or fsdp-local/hsdp under FSDP2/HSDP, docs/design.md section 6); None for AdamW and
    DeepSpeed. ``stats()`` reads local counters only (no collective), so rank 0 alone may call it."""
    stats = getattr(getattr(backend, "optimizer", None), "stats", None)
    if stats is None:
        return None
    counters = stats()
    spread = counters.get("spread_params") or []  # owner: parameters left spread (docs/design.md, 9)
    note = f" ({', '.join(spread)} spread over the shards)" if spread else ""
    grid = counters.get("owner_grid")  # HSDP: owners over the whole mesh, or in each shard group
    over = f" over {grid[0]} x {grid[1]} ranks" if grid and grid[0] > 1 else ""
    return counters.get("placement", "") + over + note


def _resume(
    backend: Backend,
    run_dir: Path,
    sampler: data.BatchSampler,
    env: DistEnv,
    stop_after: int | None,
    steps: int,
) -> int:
    """The step to start from: the newest checkpoint's (0, with a warning, without one); called only
    under ``resume``. A ``stop_after`` not past that checkpoint is refused before it is loaded."""
    latest = backend.latest_checkpoint(run_dir)
    rank_agreement.check_same_checkpoint(env, latest, str(run_dir))
    check_stop_after(stop_after, latest, steps, run_dir)
    if latest is None:
        if env.is_main:
            print(
                f"pretrain: warning: --resume: no checkpoint under {run_dir}; starting a new run",
                file=sys.stderr,
                flush=True,
            )
        return 0
    state = backend.load(run_dir, latest, {"step": 0, "data": sampler.state_dict()})
    sampler.load_state_dict(state["data"])
    return int(state["step"])


def run(
    cfg: Config,
    *,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    deepspeed_config: str | None = None,
    name: str | None = None,
) -> RunResult:
    """Train ``cfg`` into ``run_dir`` (see docs/pretrain.md); every rank calls it.

    ``resume``: continue from the newest checkpoint in ``run_dir`` (from scratch, with a warning, if
    there is none); without it a non-empty ``run_dir`` is refused. A ``run_dir`` that is a file or
    cannot be created is refused first (ConfigError). A training loss (mean over ranks) that is not
    finite ends the run with NonFiniteLoss, on every rank at the same step, before any further
    checkpoint and without the export. A KeyboardInterrupt (Ctrl-C, or SIGTERM through the launcher's
    handler) ends it with ``resume_check.Interrupted``, saying what was kept, without a checkpoint.
    ``stop_after``: end after that step with a checkpoint, as if interrupted (the lr schedule still
    spans ``train.steps``). ``deepspeed_config``: a DeepSpeed JSON; the DeepSpeed backend replaces
    the torch one (and ``parallel`` is ignored). ``name``: the config's, for loss.png's title
    (default: the run directory's).
    """
    if stop_after is not None and not 1 <= stop_after <= cfg.train.steps:
        raise ConfigError(f"--stop-after must be in [1, train.steps={cfg.train.steps}], got {stop_after}")
    check_out_path(Path(run_dir))
    env = parallel.init_distributed()
    progress = Progress(Path(run_dir), cfg.train.steps, deepspeed=deepspeed_config is not None)
    try:
        with run_lock.holding(Path(run_dir), env.is_main):
            result = _run(cfg, env, Path(run_dir), resume, stop_after, deepspeed_config, name, progress)
            # Every rank past its last collective before any rank tears the groups down: a gloo rank
            # that destroyed its groups while its peer was still finishing once aborted at exit.
            parallel.barrier(env)
        return result
    except BaseException as error:  # an interrupt: no collective from here, the other ranks may be anywhere
        if (stop := interrupt_in(error)) is None:
            raise
        raise progress.interrupted(stop, env.is_main) from None
    finally:
        parallel.shutdown(env)


def _run(
    cfg: Config,
    env: DistEnv,
    run_dir: Path,
    resume: bool,
    stop_after: int | None,
    deepspeed_config: str | None,
    name: str | None,
    progress: Progress,
) -> RunResult:

    def inputs() -> tuple[dict | None, Config, list[str]]:
        """The run directory, the DeepSpeed JSON (its params merged into cfg) and, on resume, the
        config the checkpoint was saved with (a config that differs is named key by key)."""
        checkpoint.check_run_dir(run_dir, resume, backend_name(cfg, env.world, deepspeed_config))
        resolved: tuple[dict | None, Config, list[str]] = (None, cfg, [])
        if deepspeed_config is not None:
            from soap_apps.pretrain.ds_backend import resolve_config

            resolved = resolve_config(deepspeed_config, cfg, env)
        if resume:  # before any checkpoint is read
            check_resume_config(resolved[1], run_dir, env.is_main)
        return resolved

    # one gather: every rank has looked before rank 0 writes anything into run_dir, and one that
    # refuses (its node's own disk holds another run, its copy of the JSON is missing) stops every rank
    ds_config, cfg, notes = rank_agreement.agreed(inputs)
    for line in notes if env.is_main else []:
        print(f"pretrain: {deepspeed_config}: {line}", flush=True)
    t = cfg.train
    torch.set_num_threads(t.threads or max(1, (os.cpu_count() or 1) // env.local_world))  # share the node
    d = _load_data(cfg, env)
    flags = {
        "--out": str(run_dir),
        "--resume": resume,
        "--stop-after": stop_after,
        "--deepspeed": None if deepspeed_config is None else rank_agreement.config_digest(ds_config),
    }
    corpus = rank_agreement.tokens_fingerprint(d.splits.train)
    rank_agreement.check_same_command(env, cfg, corpus, flags)  # before any collective whose sizes they set
    if resume:
        check_resume_corpus(run_dir, corpus)
    torch.manual_seed(t.seed)  # the same initial weights on every rank, before any sharding
    model = GPT(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    backend: Backend
    if deepspeed_config is not None:
        from soap_apps.pretrain.ds_backend import DeepSpeedBackend

        backend = DeepSpeedBackend(model, cfg, env, ds_config, run_dir)
        mode = f"deepspeed ({deepspeed_config})"
    else:
        backend = TorchBackend(model, cfg, env)
        mode = cfg.parallel.mode if env.distributed else "single process"
    start_step = _resume(backend, run_dir, d.sampler, env, stop_after, t.steps) if resume else 0
    progress.step, progress.total_steps = start_step, t.steps
    global_batch = t.micro_batch * t.grad_accum * env.world
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / CORPUS_FILE).write_text(corpus + "\n")
        print(
            f"pretrain: {n_params:,} parameters, {cfg.optim.name}, {mode}, world {env.world} on "
            f"{env.device.type}; global batch {global_batch} x {cfg.model.seq_len} tokens; "
            f"data {d.splits.path} ({len(d.splits.train):,} train / {len(d.splits.eval):,} held-out tokens); "
            + (f"resuming at step {start_step}" if start_step else f"starting at step 0 in {run_dir}"),
            flush=True,
        )
    unit = data.loss_unit(d.byte_level)
    metrics = Metrics(
        run_dir,
        env,
        start_step=start_step,
        total_steps=t.steps,
        tokens_per_step=global_batch * cfg.model.seq_len,
        tokens_at_start=d.sampler.next_window * cfg.model.seq_len,  # the data order's own count
        log_every=t.log_every,
        title=f"{name or run_dir.name}: {cfg.optim.name}, {backend_name(cfg, env.world, deepspeed_config)}, "
        f"world {env.world}",
        unit=unit,
        eval_windows=t.eval_batches * global_batch,
        eval_windows_before=t.eval_batches * t.micro_batch * env.world,  # (eval_batches' old unit)
    )
    progress.closers.append(metrics)  # an interrupt closes the bar before its message

    def evaluate(step: int, *, record: bool = True) -> None:
        metrics.log_eval(
            step, parallel.all_reduce_mean(backend.eval_loss(d.eval_set), env).item(), record=record
        )

    last = stop_after or t.steps
    watch = _LossWatch(env)
    last_saved = start_step or None  # the checkpoint this run resumed from
    for step in range(start_step + 1, last + 1):
        progress.step = step
        lr = lr_at(
            step,
            lr=cfg.optim.lr,
            warmup_steps=cfg.schedule.warmup_steps,
            total_steps=t.steps,
            min_lr_ratio=cfg.schedule.min_lr_ratio,
        )
        loss, norm = backend.train_step(d.sampler.next_step(), lr)
        if step == start_step + 1 and env.is_main and (placement := _soap_placement(backend)):
            metrics.note(f"pretrain: SOAP placement {placement}, world {env.world}")
        metrics.log_train(step, loss, norm, lr, force=step == last)
        watch.add(step, loss)
        evaluating = (t.eval_every and step % t.eval_every == 0) or step == t.steps
        saving = (t.checkpoint_every and step % t.checkpoint_every == 0) or step == last
        # checked where the loss is logged (from its mean), and before anything is evaluated or saved
        logged = metrics.last_train_loss if metrics.last_record_step == step else None
        if (evaluating or saving or logged is not None) and (bad := watch.first_bad(logged)) is not None:
            message = _non_finite_message(cfg, run_dir, bad, step, last_saved)
            metrics.close(plot=env.is_main and any("loss" in r for r in read_records(metrics.path)))
            if env.is_main:
                print(f"pretrain: error: {message}", file=sys.stderr, flush=True)
            # rank 0 has said why before any rank exits (torchrun ends the others once one has)
            parallel.barrier(env)
            raise NonFiniteLoss(message)
        if evaluating:
            evaluate(step)
        if saving:
            with interrupts_held(f"the checkpoint of step {step}", "pretrain" if env.is_main else None):
                backend.save(run_dir, step, {"step": step, "data": d.sampler.state_dict()})
                checkpoint.prune(run_dir, t.keep_checkpoints, env, deepspeed_config is not None)
            last_saved = step
    final_step = max(last, start_step)
    exported = None
    if final_step == t.steps:
        if start_step == t.steps:  # resumed a finished run: report its held-out loss (already recorded)
            evaluate(final_step, record=False)
        state_dict = backend.full_state_dict()
        if env.is_main:
            exported = export(
                state_dict,
                cfg.model,
                run_dir / "final",
                step=final_step,
                optimizer=cfg.optim.name,
                data=str(d.splits.path),
                byte_level=d.byte_level,
                config=cfg.to_dict(),
            )
    metrics.close()
    result = RunResult(
        final_step, metrics.last_train_loss, metrics.last_eval_loss, metrics.elapsed, run_dir, exported
    )
    if env.is_main:
        held_out = f", eval loss {result.eval_loss:.4f}" if math.isfinite(result.eval_loss) else ""
        trained = f"train loss {result.train_loss:.4f}" if math.isfinite(result.train_loss) else ""
        if start_step >= t.steps:  # a finished run resumed: nothing trained
            trained = f"already at train.steps={t.steps}, nothing to train (raise train.steps to go on)"
        print(
            f"pretrain: done at step {result.step}: {trained}{held_out} "
            f"({unit}), {result.seconds:.1f} s in the loop; outputs in {run_dir}"
            + (f", model exported to {exported}" if exported else ""),
            flush=True,
        )
    return result
