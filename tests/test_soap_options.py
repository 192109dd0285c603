"""Issue 13: pre-training and fine-tuning map their settings to SOAP through one function
(soap_apps.soap_options), so both pass the same keys; pre-training used to drop shampoo_beta and
max_precond_dim. They also share one lr schedule (soap_apps.schedule), one metrics writer
(soap_apps.jsonl) and one config loader with its error messages (soap_apps.config_loader)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

from soap_apps.finetune.config import FinetuneConfig
from soap_apps.finetune.train import soap_kwargs as finetune_kwargs
from soap_apps.pretrain.config import load_config
from soap_apps.pretrain.optim import PRETRAIN_SOAP_KEYS, build_optimizer, param_groups
from soap_apps.pretrain.optim import soap_kwargs as pretrain_kwargs
from soap_apps.soap_options import SOAP_KEYS, soap_kwargs
from soap_dist import SOAP

REPO = Path(__file__).resolve().parents[1]
SOAP_DEFAULTS = {
    name: p.default for name, p in inspect.signature(SOAP.__init__).parameters.items() if name != "self"
}


def test_both_applications_pass_the_same_soap_keys_with_soaps_defaults():
    pre = pretrain_kwargs(load_config(None, []).optim)
    fine = finetune_kwargs(FinetuneConfig())
    assert tuple(fine) == SOAP_KEYS and tuple(pre) == SOAP_KEYS + PRETRAIN_SOAP_KEYS
    assert set(SOAP_KEYS + PRETRAIN_SOAP_KEYS) <= set(SOAP_DEFAULTS)
    for key in PRETRAIN_SOAP_KEYS:  # the pretrain config's defaults are SOAP's
        assert pre[key] == SOAP_DEFAULTS[key], key
    # the config checks these values without importing torch: the same lists as SOAP's
    from soap_apps.pretrain import config as pretrain_config
    from soap_dist.placements.owner import OWNER_SCOPES
    from soap_dist.plan.schedule import SCHEDULES

    assert pretrain_config.OWNER_SCOPES == OWNER_SCOPES and pretrain_config.SCHEDULES == SCHEDULES
    for key in ("shampoo_beta", "max_precond_dim", "merge_dims", "precondition_1d", "normalize_grads"):
        assert pre[key] == fine[key] == SOAP_DEFAULTS[key], key
    with pytest.raises(TypeError, match="max_precond_dim"):  # no application can leave a key out
        soap_kwargs(**{k: v for k, v in fine.items() if k != "max_precond_dim"})


def test_pretrain_config_reaches_soap():
    cfg = load_config(
        None,
        [
            "optim.shampoo_beta=0.9",
            "optim.max_precond_dim=16",
            "optim.merge_dims=true",
            "optim.owner_scope=shard_group",
            "optim.basis_dtype=bfloat16",
            "optim.refresh_schedule=staggered",
        ],
    )
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 4))
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim, torch.device("cpu"))
    assert isinstance(opt, SOAP)
    chosen = (opt.owner_scope, opt.basis_dtype, opt.refresh_schedule)
    assert chosen == ("shard_group", torch.bfloat16, "staggered")
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
    # fine-tuning's --resume keeps the same records (through its checkpoint's step) with the same helper
    assert finetune_train.records_through is pretrain_metrics.records_through is jsonl.records_through
    log.write({"step": 3, "loss": 1.0})
    assert [r["step"] for r in jsonl.records_through(path, 2)] == [1, 2]
    assert jsonl.records_through(tmp_path / "none.jsonl", 5) == []


# ----- one loader, one set of messages (issue 13) -----
def test_unknown_keys_and_bad_values_give_the_same_messages_in_both_applications(tmp_path):
    from soap_apps.config_loader import ConfigError
    from soap_apps.finetune.config import load_config as finetune_config
    from soap_apps.pretrain.config import ConfigError as PretrainError

    assert PretrainError is ConfigError
    pre = tmp_path / "pre.yaml"
    pre.write_text("train:\n  stepz: 3\n")
    fine = tmp_path / "fine.yaml"
    fine.write_text("stepz: 3\n")
    unknown = r"unknown config key '{}' \({}\); the keys{} are: "
    with pytest.raises(
        ConfigError, match=unknown.format("train.stepz", f"in {pre}", " of 'train'") + "steps,"
    ):
        load_config(pre)
    with pytest.raises(ConfigError, match=unknown.format("stepz", f"in {fine}", "") + "model, init_from,"):
        finetune_config(fine)
    override = r"\(from the override '{}'\)"
    with pytest.raises(ConfigError, match=override.format("train.stepz=3")):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=override.format("stepz=3")):
        finetune_config(None, ["stepz=3"])
    for pre_key, fine_key, value, what in [
        ("train.steps", "steps", "many", "an integer"),
        ("optim.lr", "lr", "fast", "a number"),
        ("optim.merge_dims", "merge_dims", "3", "true or false"),
    ]:
        for load, key in ((load_config, pre_key), (finetune_config, fine_key)):
            got = f"got {int(value)!r}" if value.isdigit() else f"got {value!r}"
            with pytest.raises(ConfigError, match=rf"^{key} must be {what}, {got}$"):
                load(None, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=r"an override must look like key=value \(e.g. steps=20\)"):
        finetune_config(None, ["steps"])
    with pytest.raises(
        ConfigError, match=r"config file '.*missing.yaml' does not exist \(see configs/finetune/"
    ):
        finetune_config(tmp_path / "missing.yaml")
    fine.write_text("- steps\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping of keys, got list"):
        finetune_config(fine)


def test_finetune_yaml_and_set_round_trip_under_the_flags(tmp_path, capsys):
    from soap_apps.finetune.config import load_config as finetune_config
    from soap_apps.finetune.config import parse_args

    shipped = finetune_config(REPO / "configs" / "finetune" / "quick-cpu.yaml")
    assert shipped.fused == "off" and shipped.steps == 50 and shipped.data is None  # YAML's off: the word
    path = tmp_path / "ft.yaml"
    cfg = FinetuneConfig(steps=7, lr=1e-3, block_size=64, merge_dims=True, mixed_precision="no", fused="on")
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert finetune_config(path) == cfg  # every field survives the file
    assert parse_args(["--config", str(path)]) == cfg
    # the file, then --set, then the explicit flags
    got = parse_args(["--config", str(path), "--set", "steps=9", "--set", "block_size=null", "--steps", "11"])
    assert (got.steps, got.block_size, got.lr, got.merge_dims) == (11, None, 1e-3, True)
    assert parse_args(["--set", "lr=2e-3", "--batch-size", "4"]) == FinetuneConfig(lr=2e-3, batch_size=4)
    assert parse_args(["--steps", "5"]) == FinetuneConfig(steps=5)  # the flags alone, as before
    for argv, message in [
        (["--set", "stepz=3"], "launchers/finetune.py: error: unknown config key 'stepz' (from the override"),
        (["--set", "steps=many"], "launchers/finetune.py: error: steps must be an integer, got 'many'"),
        (["--set", "steps=0"], "launchers/finetune.py: error: steps must be >= 1, got 0"),  # the flag check
    ]:
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
