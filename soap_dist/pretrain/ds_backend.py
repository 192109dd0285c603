"""The loop's steps under DeepSpeed (``launchers/pretrain.py --deepspeed configs/deepspeed/zero2.json``).

The engine comes from ``soap_dist.deepspeed.initialize``, which has ``deepspeed.initialize``'s
signature and builds SOAP from the JSON's ``"optimizer": {"type": "SOAP", ...}`` block. DeepSpeed
owns gradient accumulation (``engine.backward`` scales by 1/gradient_accumulation_steps and
``engine.step`` steps only at the boundary), clipping (``gradient_clipping``) and bf16.

The YAML config is the single source of the values both files could give. ``resolve_config`` fills
them into the JSON before the engine sees it: ``train_micro_batch_size_per_gpu`` (train.micro_batch),
``gradient_accumulation_steps`` (train.grad_accum), ``train_batch_size`` (their product times the
world size), ``gradient_clipping`` (optim.grad_clip, 0 = none), the optimizer type (optim.name) and its
hyper-parameters (optim.*), and ``bf16.enabled`` on CUDA when train.bf16 (never on CPU). A JSON value
it replaces is named on rank 0; the resolved JSON is written to ``<run>/ds_config.json``.

The lr schedule is applied by setting ``lr`` in ``engine.optimizer.param_groups`` before each
optimizer step. Checkpoints: ``engine.save_checkpoint(<run>/checkpoints, tag="step_N")`` with the
step and data position as client state (DeepSpeed keeps no RNG state: the model has no dropout and
the data order is a function of the seed and the position).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from soap_dist.pretrain import checkpoint, data
from soap_dist.pretrain.config import Config, ConfigError
from soap_dist.pretrain.model import GPT, lm_loss
from soap_dist.pretrain.optim import param_groups, soap_kwargs
from soap_dist.pretrain.parallel import DistEnv

DS_OPTIMIZER_TYPES = {"soap": "SOAP", "adamw": "AdamW"}


def resolve_config(path: str | Path, cfg: Config, env: DistEnv) -> tuple[dict[str, Any], list[str]]:
    """The DeepSpeed JSON at ``path`` with the values the YAML config decides filled in (module docstring).

    Returns the config dict and one line per JSON value that was replaced by a different one.
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
    t, o = cfg.train, cfg.optim
    params = (
        soap_kwargs(o) if o.name == "soap" else {"lr": o.lr, "eps": o.eps, "weight_decay": o.weight_decay}
    )
    params["betas"] = list(o.betas)  # as JSON has it, so an equal JSON value is not reported as replaced
    filled: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * env.world,
        "gradient_clipping": o.grad_clip or 0.0,
    }
    replaced = [f"{k}: {ds[k]!r} -> {v!r}" for k, v in filled.items() if k in ds and ds[k] not in ("auto", v)]
    ds.update(filled)
    block = ds.setdefault("optimizer", {})
    old_type, block["type"] = block.get("type"), DS_OPTIMIZER_TYPES[o.name]
    if old_type not in (None, block["type"]):
        replaced.append(f"optimizer.type: {old_type!r} -> {block['type']!r} (optim.name)")
    old_params = block.get("params", {})
    replaced += [
        f"optimizer.params.{k}: {old_params[k]!r} -> {v!r}"
        for k, v in params.items()
        if k in old_params and old_params[k] not in ("auto", v)
    ]
    block["params"] = params
    if env.device.type == "cuda" and t.bf16:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    return ds, replaced


class DeepSpeedBackend:
    """Steps, evaluation, checkpoints and export through a DeepSpeed engine (ZeRO stage from the JSON)."""

    def __init__(self, model: GPT, cfg: Config, env: DistEnv, config_path: str, run_dir: Path) -> None:
        from soap_dist.deepspeed import initialize  # imported here: DeepSpeed is an optional dependency

        self.cfg, self.env = cfg, env
        ds_config, replaced = resolve_config(config_path, cfg, env)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
            for line in replaced:
                print(f"pretrain: {config_path}: {line} (from the pretrain config)", flush=True)
        # without names: ZeRO swaps each group's params for flat partitions, which names would not match
        groups = [
            {k: v for k, v in g.items() if k != "param_names"}
            for g in param_groups(model, cfg.optim.weight_decay)
        ]
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
        """The step named by DeepSpeed's ``latest`` file, which it writes once a save has completed."""
        latest = run_dir / checkpoint.CHECKPOINTS / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not tag.startswith("step_") or not (latest.parent / tag).is_dir():
            raise ConfigError(f"{latest} names {tag!r}, which is not a step_N checkpoint of this launcher")
        return int(tag.removeprefix("step_"))

    def save(self, run_dir: Path, step: int, train_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(
            str(run_dir / checkpoint.CHECKPOINTS), tag=f"step_{step}", client_state={"train": train_state}
        )

    def load(self, run_dir: Path, step: int, train_template: dict[str, Any]) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(
            str(run_dir / checkpoint.CHECKPOINTS), tag=f"step_{step}"
        )
        if path is None or "train" not in (client_state or {}):
            raise ConfigError(
                f"--resume: {run_dir / checkpoint.CHECKPOINTS / f'step_{step}'} is not a checkpoint "
                "this launcher wrote under --deepspeed"
            )
        return client_state["train"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Rank 0's fp32 copy of the module's weights (gathered from the partitions under ZeRO-3)."""
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                return self._copy_state() if self.env.is_main else {}
        return self._copy_state() if self.env.is_main else {}

    def _copy_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.module.state_dict().items()}
