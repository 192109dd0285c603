"""The torch backend of the pre-training loop: FSDP2, DDP, HSDP or one process, with SOAP or AdamW.

``Backend`` is what the loop (``trainer``) asks of any backend; ``TorchBackend`` answers it with
torch's own parallelism (``parallel.wrap_model``) and DCP checkpoints (``checkpoint``), and
``ds_backend.DeepSpeedBackend`` with DeepSpeed's. Every method is called on every rank.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from soap_apps.pretrain import checkpoint, data, parallel
from soap_apps.pretrain.config import Config
from soap_apps.pretrain.model import GPT, lm_loss
from soap_apps.pretrain.optim import build_optimizer, param_groups
from soap_apps.pretrain.parallel import DistEnv


class Backend(Protocol):
    """What the loop needs from a parallelism backend; every method is called on every rank."""

    def train_step(self, batches: list[data.Batch], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches: (mean loss on this rank, global grad norm)."""
        ...

    def eval_loss(self, batches: list[data.Batch]) -> torch.Tensor: ...

    def latest_checkpoint(self, run_dir: Path) -> int | None: ...

    def save(self, run_dir: Path, step: int, train_state: dict[str, Any]) -> None: ...

    def load(self, run_dir: Path, step: int, train_template: dict[str, Any]) -> dict[str, Any]: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unwrapped GPT's full state_dict on rank 0 (empty elsewhere)."""
        ...


def _autocast(env: DistEnv, bf16: bool) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA when asked; CPU always runs fp32."""
    if env.device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: data.Batch, device: torch.device) -> data.Batch:
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


class TorchBackend:
    """FSDP2 / DDP / HSDP / one process, with SOAP or AdamW; checkpoints through DCP."""

    def __init__(self, model: GPT, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.model = parallel.wrap_model(
            model.to(env.device), cfg.parallel.mode, env, cfg.parallel.hsdp_shard_size
        )
        groups = param_groups(self.model, cfg.optim.weight_decay)
        self.optimizer = build_optimizer(groups, cfg.optim, env.device)

    def _loss(self, batch: data.Batch) -> torch.Tensor:
        x, y = _to(batch, self.env.device)
        with _autocast(self.env, self.cfg.train.bf16):
            logits = self.model(x)
        return lm_loss(logits, y)

    def train_step(self, batches: list[data.Batch], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.env.device)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or self.cfg.parallel.sync_every_micro_batch
            with parallel.gradient_sync(self.model, sync):
                loss = self._loss(batch)
                (loss / len(batches)).backward()
            total += loss.detach()
        norm = parallel.clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(batches), norm

    @torch.no_grad()
    def eval_loss(self, batches: list[data.Batch]) -> torch.Tensor:
        self.model.eval()
        total = sum(self._loss(b) for b in batches)
        self.model.train()
        return total / len(batches)

    def latest_checkpoint(self, run_dir: Path) -> int | None:
        steps = checkpoint.checkpoint_steps(run_dir)
        return steps[-1] if steps else None

    def save(self, run_dir: Path, step: int, train_state: dict[str, Any]) -> None:
        checkpoint.save(checkpoint.step_dir(run_dir, step), self.model, self.optimizer, train_state, self.env)

    def load(self, run_dir: Path, step: int, train_template: dict[str, Any]) -> dict[str, Any]:
        path = checkpoint.step_dir(run_dir, step)
        return checkpoint.load(path, self.model, self.optimizer, train_template, self.env)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
