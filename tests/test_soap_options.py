"""Issue 13: pre-training and fine-tuning map their settings to SOAP through one function
(soap_apps.soap_options), so both pass the same keys; pre-training used to drop shampoo_beta and
max_precond_dim."""

from __future__ import annotations

import inspect

import pytest
import torch

from soap_apps.finetune.config import FinetuneConfig
from soap_apps.finetune.train import soap_kwargs as finetune_kwargs
from soap_apps.pretrain.config import load_config
from soap_apps.pretrain.optim import build_optimizer, param_groups
from soap_apps.pretrain.optim import soap_kwargs as pretrain_kwargs
from soap_apps.soap_options import SOAP_KEYS, soap_kwargs
from soap_dist import SOAP

SOAP_DEFAULTS = {
    name: p.default for name, p in inspect.signature(SOAP.__init__).parameters.items() if name != "self"
}


def test_both_applications_pass_the_same_soap_keys_with_soaps_defaults():
    pre = pretrain_kwargs(load_config(None, []).optim)
    fine = finetune_kwargs(FinetuneConfig())
    assert tuple(pre) == tuple(fine) == SOAP_KEYS
    assert set(SOAP_KEYS) <= set(SOAP_DEFAULTS)
    for key in ("shampoo_beta", "max_precond_dim", "merge_dims", "precondition_1d", "normalize_grads"):
        assert pre[key] == fine[key] == SOAP_DEFAULTS[key], key
    with pytest.raises(TypeError, match="max_precond_dim"):  # no application can leave a key out
        soap_kwargs(**{k: v for k, v in pre.items() if k != "max_precond_dim"})


def test_pretrain_config_reaches_soap():
    cfg = load_config(None, ["optim.shampoo_beta=0.9", "optim.max_precond_dim=16", "optim.merge_dims=true"])
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 4))
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim, torch.device("cpu"))
    assert isinstance(opt, SOAP)
    assert (opt.defaults["shampoo_beta"], opt.defaults["max_precond_dim"], opt.defaults["merge_dims"]) == (
        0.9,
        16,
        True,
    )


# ----- one lr schedule (issue 13) -----
def test_both_applications_use_one_lr_schedule():
    from soap_apps import schedule
    from soap_apps.finetune import train as finetune_train
    from soap_apps.pretrain import trainer as pretrain_trainer

    assert pretrain_trainer.lr_at is schedule.lr_at
    cfg = FinetuneConfig(steps=20, lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    kw = dict(lr=1.0, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    # fine-tuning's 0-based step s is the schedule's step s + 1
    for s in (0, 1, 3, 4, 5, 11, 19, 25):
        assert finetune_train.lr_at(cfg, s) == schedule.lr_at(s + 1, **kw)
    assert [finetune_train.lr_at(cfg, s) for s in (0, 3)] == [0.25, 1.0]  # warmup ends at the peak
    assert finetune_train.lr_at(cfg, 19) == pytest.approx(0.1)  # the last step is at the floor


# ----- one metrics writer (issue 13) -----
def test_both_applications_write_metrics_through_one_rank0_jsonl_log(tmp_path):
    from soap_apps import jsonl
    from soap_apps.finetune import train as finetune_train
    from soap_apps.pretrain import metrics as pretrain_metrics
    from soap_apps.pretrain.parallel import DistEnv

    assert finetune_train.JsonlLog is pretrain_metrics.JsonlLog is jsonl.JsonlLog
    path = tmp_path / "run" / "metrics.jsonl"
    jsonl.JsonlLog(path, enabled=False).write({"step": 1})  # not rank 0: nothing, not even the dir
    assert not path.parent.exists()
    log = jsonl.JsonlLog(path, enabled=True)
    log.write({"step": 1, "loss": 2.5})
    log.write({"step": 2, "eval_loss": 2.0})
    assert jsonl.read_records(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "eval_loss": 2.0}]
    # pre-training's Metrics: a resumed run keeps the records up to its step, then appends
    env = DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    m = pretrain_metrics.Metrics(
        path.parent, env, start_step=1, total_steps=3, tokens_per_step=10, log_every=1
    )
    m.log_train(2, torch.tensor(1.5), torch.tensor(0.5), 0.1, force=False)
    m.close(plot=False)
    rows = jsonl.read_records(path)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 1.5 and rows[1]["tokens"] == 20
