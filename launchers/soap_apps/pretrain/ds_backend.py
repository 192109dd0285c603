"""The loop's steps under DeepSpeed (``launchers/pretrain.py --deepspeed configs/deepspeed/zero2.json``).

The engine comes from ``soap_dist.deepspeed.initialize``, which has ``deepspeed.initialize``'s
signature and builds SOAP from the JSON's ``"optimizer": {"type": "SOAP", ...}`` block. DeepSpeed
owns gradient accumulation (``engine.backward`` scales by 1/gradient_accumulation_steps and
``engine.step`` steps only at the boundary), clipping (``gradient_clipping``) and bf16.

``resolve_config`` settles the values both files could give before the engine sees the JSON. The
YAML config decides ``train_micro_batch_size_per_gpu`` (train.micro_batch),
``gradient_accumulation_steps`` (train.grad_accum), ``train_batch_size`` (their product times the
world size), ``gradient_clipping`` (optim.grad_clip, 0 = none), the optimizer type (optim.name) and
``bf16.enabled`` on CUDA when train.bf16 (never on CPU). The optimizer's hyper-parameters merge the
other way: a key given in the JSON's ``optimizer.params`` wins over optim.* (unknown keys are an
error), the rest come from the config (``merge_optimizer_params``). Rank 0 prints which value came
from where; the resolved JSON is written to ``<run>/ds_config.json``.

The lr schedule is applied by setting ``lr`` in ``engine.optimizer.param_groups`` before each
optimizer step. Checkpoints: ``engine.save_checkpoint(<run>/checkpoints, tag="step_N")`` with the
step and data position as client state (DeepSpeed keeps no RNG state: the model has no dropout and
the data order is a function of the seed and the position). A checkpoint that cannot be read on
``--resume`` is one line on every rank, as under torchrun (``checkpoint.unreadable``).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import sys
import traceback
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from soap_apps.pretrain import checkpoint, data
from soap_apps.pretrain.config import Config, ConfigError, apply_overrides
from soap_apps.pretrain.model import GPT, lm_loss
from soap_apps.pretrain.optim import PRETRAIN_SOAP_KEYS, param_groups, soap_kwargs
from soap_apps.pretrain.parallel import DistEnv
from soap_apps.quiet import (
    deepspeed_cpu_without_probe,
    no_deprecated_all_gather_warning,
    no_untested_optimizer_banner,
)
from soap_apps.soap_options import SOAP_KEYS

DS_OPTIMIZER_TYPES = {"soap": "SOAP", "adamw": "AdamW"}
ADAMW_PARAMS = ("lr", "betas", "eps", "weight_decay")
# optimizer params that are also keys of the pretrain config's optim section
OPTIM_KEYS = SOAP_KEYS + PRETRAIN_SOAP_KEYS
# SOAP arguments the launcher decides (DeepSpeed's partitions pick the placement): not JSON params
LAUNCHER_OWNED = ("self", "params", "placement", "process_group", "device_mesh")


def allowed_params(optimizer: str) -> list[str]:
    """The keys ``optimizer.params`` may hold for ``optimizer`` ("SOAP" or "AdamW")."""
    if optimizer != "SOAP":
        return list(ADAMW_PARAMS)
    from soap_dist import SOAP

    return [n for n in inspect.signature(SOAP.__init__).parameters if n not in LAUNCHER_OWNED]


def merge_optimizer_params(
    block: dict[str, Any], cfg: Config, where: str
) -> tuple[Config, dict[str, Any], list[str]]:
    """The JSON's ``optimizer.params`` over the config's ``optim`` section (docs/pretrain.md, DeepSpeed).

    A key given in the JSON wins, unless its value is "auto"; the others come from the config. Keys
    that are ``optim.*`` keys go into the returned config (so the lr schedule, the weight-decay
    groups and config.yaml use them too); other SOAP arguments (``max_precond_dim``, ...) are
    returned as extra keyword arguments. Unknown keys are an error naming the allowed ones. Params
    written for another optimizer type than ``optim.name`` builds are not used (and said so).
    Returns (config, extra kwargs, lines saying which value came from where).
    """
    want = DS_OPTIMIZER_TYPES[cfg.optim.name]
    given = block.get("params") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: optimizer.params must be a mapping, got {given!r}")
    json_type = block.get("type")
    if json_type is not None and str(json_type).lower() != want.lower():
        note = (
            f"optimizer.params ({', '.join(given)}) not used: they are {json_type}'s, and "
            f"optim.name={cfg.optim.name!r} builds {want} from the config"
        )
        return cfg, {}, [note] if given else []
    allowed = allowed_params(want)
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ConfigError(
            f"{where}: unknown {want} key {unknown[0]!r} in optimizer.params; the keys it takes are: "
            f"{', '.join(allowed)}"
        )
    taken = {k: v for k, v in given.items() if v != "auto"}
    merged = apply_overrides(cfg, [(f"optim.{k}", v) for k, v in taken.items() if k in OPTIM_KEYS], where)
    notes = [
        f"optim.{k}: {getattr(cfg.optim, k)!r} -> {getattr(merged.optim, k)!r} (the JSON's optimizer.params)"
        for k in OPTIM_KEYS
        if k in taken and getattr(cfg.optim, k) != getattr(merged.optim, k)
    ]
    from_json = [k for k in given if k in taken]
    from_config = [k for k in (OPTIM_KEYS if want == "SOAP" else ADAMW_PARAMS) if k not in taken]
    notes.append(
        f"{want} params from the JSON: {', '.join(from_json) or 'none'}; "
        f"from the config (optim.*): {', '.join(from_config) or 'none'}"
    )
    return merged, {k: v for k, v in taken.items() if k not in OPTIM_KEYS}, notes


def resolve_config(path: str | Path, cfg: Config, env: DistEnv) -> tuple[dict[str, Any], Config, list[str]]:
    """The DeepSpeed JSON at ``path`` with the values the config decides filled in, and the config
    with the JSON's optimizer params merged in (module docstring; ``merge_optimizer_params``).

    Returns the DeepSpeed config dict, the merged config, and one line per value taken from one file
    over the other.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--deepspeed {str(path)!r}: no such file (see configs/deepspeed/zero{{0,1,2,3}}.json)"
        )
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({error})") from error
    block = ds.setdefault("optimizer", {})
    cfg, extra, notes = merge_optimizer_params(block, cfg, f"--deepspeed {path}")
    t, o = cfg.train, cfg.optim
    params = (
        {**soap_kwargs(o), **extra}
        if o.name == "soap"
        # torch's AdamW (the other routes' one): DeepSpeed's own is an extension it compiles at the
        # first run without a word (over 2 minutes on 2 CPU cores; nvcc on a GPU)
        else {"lr": o.lr, "eps": o.eps, "weight_decay": o.weight_decay, "torch_adam": True}
    )
    params["betas"] = list(o.betas)  # as JSON has it
    filled: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * env.world,
        "gradient_clipping": o.grad_clip or 0.0,
    }
    notes += [
        f"{k}: {ds[k]!r} -> {v!r} (from the pretrain config)"
        for k, v in filled.items()
        if k in ds and ds[k] not in ("auto", v)
    ]
    ds.update(filled)
    old_type, block["type"] = block.get("type"), DS_OPTIMIZER_TYPES[o.name]
    if old_type not in (None, block["type"]):
        notes.append(f"optimizer.type: {old_type!r} -> {block['type']!r} (optim.name)")
    block["params"] = params
    if env.device.type == "cuda" and t.bf16:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    return ds, cfg, notes


LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MANY_TASKS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # launchers that set no RANK


def one_process_launch_env() -> None:
    """Let ``python launchers/pretrain.py --deepspeed ...`` run as one process. DeepSpeed reads its
    rank from the launcher's environment (torchrun, deepspeed) and, without it, asks MPI (mpi4py,
    rarely installed). With none of it set, this sets that of a one-rank launch (a free local port);
    with only part of it set (not a launcher's doing), a ConfigError says how to launch instead."""
    present = [k for k in LAUNCH_ENV if os.environ.get(k)]
    if len(present) == len(LAUNCH_ENV):
        return
    many = {k: v for k in MANY_TASKS if (v := os.environ.get(k, "1")) != "1"}
    if not present and many:  # srun / mpirun: N processes, each of which would train alone
        raise ConfigError(
            f"--deepspeed: this process is one of several ({', '.join(f'{k}={v}' for k, v in many.items())}) "
            "but no RANK/WORLD_SIZE is set, so each would train alone; start it with `deepspeed` or "
            "`torchrun --nproc_per_node=N`, or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
        )
    if any(k in present for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        missing = ", ".join(k for k in LAUNCH_ENV if k not in present)
        raise ConfigError(
            f"--deepspeed: the environment sets {', '.join(present)} but not {missing}; run under "
            "`torchrun --nproc_per_node=N` or `deepspeed`, which set them all, or unset them for one process"
        )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


class DeepSpeedBackend:
    """Steps, evaluation, checkpoints and export through a DeepSpeed engine (ZeRO stage from the JSON)."""

    def __init__(
        self, model: GPT, cfg: Config, env: DistEnv, ds_config: dict[str, Any], run_dir: Path
    ) -> None:
        """``cfg`` and ``ds_config``: what ``resolve_config`` returned (the config already merged)."""
        deepspeed_cpu_without_probe()
        no_deprecated_all_gather_warning()
        from soap_dist.deepspeed import initialize  # imported here: DeepSpeed is an optional dependency

        one_process_launch_env()  # before DeepSpeed looks for its launcher

        self.cfg, self.env = cfg, env
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        # without names: ZeRO swaps each group's params for flat partitions, which names would not match
        groups = [
            {k: v for k, v in g.items() if k != "param_names"}
            for g in param_groups(model, cfg.optim.weight_decay)
        ]
        with no_untested_optimizer_banner():  # SOAP is not on DeepSpeed's list; soap_dist supports it
            self.engine, _, _, _ = initialize(
                model=model.to(env.device), model_parameters=groups, config=ds_config
            )
        self.module = self.engine.module

    def _loss(self, batch: data.Batch) -> torch.Tensor:
        x, y = batch[0].to(self.env.device), batch[1].to(self.env.device)
        return lm_loss(self.engine(x), y)  # under bf16 the engine's module is bf16; the loss is fp32

    def train_step(self, batches: list[data.Batch], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.env.device)
        for i, batch in enumerate(batches):
            loss = self._loss(batch)
            self.engine.backward(loss)
            if i == len(batches) - 1:
                module_norm = self._module_grad_norm()
            self.engine.step()  # an optimizer step only after the last micro-batch
            total += loss.detach()
        norm = self.engine.get_global_grad_norm()
        norm = module_norm if norm is None else torch.as_tensor(norm, dtype=torch.float32)
        return total / len(batches), norm

    def _module_grad_norm(self) -> torch.Tensor:
        """The norm of the module's (already averaged) gradients: what stage 0 in fp32 does not report.

        Under ZeRO 1-3 the module holds no gradients (they live in the partitions) and this is NaN;
        DeepSpeed's own global norm is used there.
        """
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(float("nan"))

    @torch.no_grad()
    def eval_loss(self, batches: list[data.Batch]) -> torch.Tensor:
        self.engine.eval()
        total = sum(self._loss(b) for b in batches)
        self.engine.train()
        return total / len(batches)

    def latest_checkpoint(self, run_dir: Path) -> int | None:
        """The step of the checkpoint DeepSpeed's ``latest`` file names (written once a save has
        completed) or, where that directory is gone (deleted as an unreadable checkpoint's message
        advises), of the newest one before it, with a warning. A ``latest`` that names no step_N is a
        ConfigError saying how to mend it."""
        tag = checkpoint.deepspeed_latest(run_dir)
        if tag is None:
            return None
        latest, steps = run_dir / checkpoint.CHECKPOINTS / "latest", checkpoint.complete_steps(run_dir, True)
        if not re.fullmatch(r"step_\d+", tag):
            present = [f"step_{s}" for s in checkpoint.steps_present(run_dir)]
            raise ConfigError(
                f"--resume: {latest} does not name a checkpoint (it holds {tag[:40]!r}); it was probably "
                "damaged: write into it the name of the newest checkpoint whose save completed "
                + (f"({', '.join(present)} are there)" if present else "(there is none: delete it)")
                + " and resume again"
            )
        if self.env.is_main and (not steps or f"step_{steps[-1]}" != tag):
            then = (
                f"resuming from {checkpoint.step_dir(run_dir, steps[-1])}"
                if steps
                else "no checkpoint is before it"
            )
            warning = f"pretrain: warning: --resume: {latest} names {tag}, which is gone; {then}"
            print(warning, file=sys.stderr, flush=True)
        return steps[-1] if steps else None

    def save(self, run_dir: Path, step: int, train_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(
            str(run_dir / checkpoint.CHECKPOINTS), tag=f"step_{step}", client_state={"train": train_state}
        )

    def load(self, run_dir: Path, step: int, train_template: dict[str, Any]) -> dict[str, Any]:
        """Load checkpoint ``step`` into the engine; returns its train state. A checkpoint that cannot
        be read is a ConfigError on every rank (``checkpoint.unreadable``), as under torchrun."""
        root, tag = run_dir / checkpoint.CHECKPOINTS, f"step_{step}"
        checkpoint.reading(root / tag, self.env, lambda: self._open_files(root, tag), deepspeed=True)
        path, client_state = checkpoint.reading(
            root / tag, self.env, lambda: self.engine.load_checkpoint(str(root), tag=tag), deepspeed=True
        )
        if path is None or "train" not in (client_state or {}):
            raise ConfigError(
                f"--resume: {root / tag} is not a checkpoint this launcher wrote under --deepspeed"
            )
        return client_state["train"]

    def _open_files(self, root: Path, tag: str) -> None:
        """Open (tensors mapped, not read) this rank's model states in checkpoint ``tag`` and its share
        of the files of the ranks that saved it (those of every world-th rank from this one), so that a
        file missing or cut short fails here, where the ranks agree (``checkpoint.reading``), and not
        inside ``load_checkpoint``, in whose collectives the other ranks would wait for a rank that
        failed alone. The file names are DeepSpeed's own (its version is pinned)."""
        e, where = self.engine, str(root)
        try:
            saved = _open(e._get_ckpt_name(where, tag))  # every rank reads its own model states
            names = set()
            for rank in range(self.env.rank, int(saved.get("dp_world_size", self.env.world)), self.env.world):
                if e.zero_optimization_partition_weights():  # ZeRO-3: model states of each rank
                    names.add(e._get_ckpt_name(where, tag, pp_placeholder=str(rank)))
                if e.zero_optimization():
                    mp_rank, bf16 = e.checkpoint_mp_rank, e.bfloat16_enabled()
                    names.add(e._get_rank_zero_ckpt_name(where, tag, mp_rank, rank, bf16))
            for name in sorted(names):
                _open(name)
        except Exception as error:  # named with this rank, as DCP's CheckpointException names it
            failure = (error, traceback.extract_tb(error.__traceback__))
            raise CheckpointException(f"reading {root / tag}", {self.env.rank: failure}) from error

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Rank 0's fp32 copy of the module's weights (gathered from the partitions under ZeRO-3)."""
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                return self._copy_state() if self.env.is_main else {}
        return self._copy_state() if self.env.is_main else {}

    def _copy_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.module.state_dict().items()}


def _open(name: str) -> Any:
    """A DeepSpeed checkpoint file as ``torch.load`` gives it, its tensors memory-mapped (not read). A
    file that is no whole zip archive (``torch.save``'s format), as one cut short is, is an EOFError
    naming it: torch says so in several ways (a RuntimeError, an OSError, or for an empty file that
    mmap needs a zip), which would not read as a file cut short."""
    try:
        return torch.load(name, map_location="cpu", mmap=True, weights_only=False)
    except (RuntimeError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        try:
            zipfile.ZipFile(name).close()
        except zipfile.BadZipFile:
            whole = f"not a whole zip archive; torch.load raised {type(error).__name__}"
            raise EOFError(f"{Path(name).name} is cut short ({whole})") from error
        raise
