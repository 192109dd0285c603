"""Accelerate fine-tuning (launchers/finetune.py, soap_apps.finetune) and the HF Trainer route, on CPU.

- the real command, ``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml
  launchers/finetune.py``, with 2 processes on gloo;
- DDP, FSDP2 and DeepSpeed ZeRO-2 run the launcher's loop in one spawned 2-process group
  (accelerate_scenarios.py); FSDP2 with Accelerate's state forced to FSDP, a test-only device: on
  CPU Accelerate ignores the FSDP plugin;
- checkpoints: save_state at step 3, a fresh run that load_states it must log the same losses;
- the Trainer route and the bad-input checks run in this process.

Each 2-process start costs ~8-15 s on a 2-core machine (interpreter start-up and imports).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import accelerate_scenarios
import pytest
import torch

from soap_apps.config_loader import ConfigError
from soap_apps.finetune.checkpoints import MARKER, resume_dir
from soap_apps.finetune.config import FinetuneConfig, parse_args
from soap_apps.finetune.launch import check_launch
from soap_dist import SOAP

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT = accelerate_scenarios.STEPS, accelerate_scenarios.SAVE_AT
SMALL = [
    "--steps", str(STEPS), "--batch-size", "4", "--context", "64", "--max-bytes", "200000",
    "--eval-every", str(SAVE_AT), "--eval-windows", "32", "--save-every", str(SAVE_AT),
    "--fused", "off", "--precondition-frequency", "2", "--threads", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def isolated_accelerate_state():
    """In-process tests build Accelerators and TrainingArguments: leave no state or env behind."""
    env = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(env)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def launch(config: str, out: Path, *flags: str) -> list[dict]:
    """Run ``accelerate launch --config_file configs/accelerate/<config> launchers/finetune.py``;
    return its metric rows."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        # an empty extension cache, as on a fresh CI machine: the launcher must not JIT-build
        # DeepSpeed's shm op (it would cost ~40 s here)
        "TORCH_EXTENSIONS_DIR": str(out.parent / f"{out.name}_torch_extensions"),
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / config),
        str(REPO / "launchers" / "finetune.py"), *SMALL, "--output-dir", str(out), *flags,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    # issue 13: DeepSpeed's banner and FutureWarning, Accelerate's tied-weights note (soap_apps/quiet.py)
    for message in ("untested optimizer", "all_gather_into_tensor", "Removed shared tensor"):
        assert message not in proc.stdout + proc.stderr, (message, proc.stdout[-3000:], proc.stderr[-3000:])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def evals(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}


def start(rows: list[dict]) -> dict:
    return next(r for r in rows if r.get("event") == "start")


def assert_trains(rows: list[dict]) -> None:
    curve = losses(rows)
    assert sorted(curve) == list(range(1, STEPS + 1)), "the run did not complete every step"
    assert all(torch.isfinite(torch.tensor(v)) for v in curve.values())
    # bytes from a random init start near ln 256 = 5.55 and fall fast once SOAP moves (step 2 on)
    assert curve[STEPS] < curve[1] - 0.3, curve
    assert evals(rows)[STEPS] < evals(rows)[SAVE_AT], evals(rows)


def assert_resume_identical(full: list[dict], resumed: list[dict]) -> None:
    assert start(resumed)["step"] == SAVE_AT and start(resumed)["resumed_from"].endswith(f"step_{SAVE_AT}")
    after = {s: v for s, v in losses(full).items() if s > SAVE_AT}
    assert losses(resumed) == after  # exactly: same data, same state, same arithmetic
    assert evals(resumed)[STEPS] == evals(full)[STEPS]


# ----- 2-process runs (module-scoped: each is a process group start-up) -----
@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return accelerate_scenarios.run(str(tmp_path_factory.mktemp("spawned")))


def scenario(ranks: list[dict], name: str) -> list[dict]:
    for r, res in enumerate(ranks):
        assert "exception" not in res[name], f"{name}: rank {r} raised:\n{res[name]['exception']}"
    return [res[name] for res in ranks]


@pytest.fixture(scope="module")
def ddp(spawned):
    return scenario(spawned, "ddp")


@pytest.fixture(scope="module")
def fsdp2(spawned):
    return scenario(spawned, "fsdp2")


@pytest.fixture(scope="module")
def zero2(spawned):
    return scenario(spawned, "zero2")


def test_accelerate_launch_deepspeed_zero2_command(tmp_path):
    """The documented command end to end (config YAML -> JSON -> launcher), 2 micro-batches per step."""
    rows = launch("deepspeed_zero2.yaml", tmp_path / "run", "--grad-accum", "2")
    first = start(rows)
    assert first["world"] == 2 and first["distributed_type"] == "DistributedType.DEEPSPEED"
    assert first["config"]["grad_accum"] == 2
    # SOAP reports how it was driven: under ZeRO 1-2, by soap_dist.deepspeed's partition mapping
    assert rows[1]["soap_placement"] == "zero"
    assert_trains(rows)


def test_deepspeed_zero2_trains_with_soap(zero2):
    for rank in zero2:
        first = start(rank["full"])
        assert first["world"] == 2 and first["distributed_type"] == "DistributedType.DEEPSPEED"
        assert rank["soap_type"] == "SOAP" and rank["placement"] == "zero"
        assert_trains(rank["full"])


def test_deepspeed_zero2_save_state_load_state_continues_identically(zero2):
    for rank in zero2:
        assert_resume_identical(rank["full"], rank["resumed"])


def test_fsdp2_gives_soap_sharded_dtensors(fsdp2):
    for rank in fsdp2:
        assert rank["soap_type"] == "SOAP" and rank["n_params"] > 0
        assert rank["all_dtensor"] and rank["all_shard0"], "Accelerate did not swap in Shard(0) DTensors"
        assert rank["model_params_are_optimizer_params"]
        # "auto" picks owner here: the column factors are larger than the shards (docs/design.md)
        assert rank["placement"] == "owner" and rank["world"] == 2
        assert start(rank["full"])["distributed_type"] == "DistributedType.FSDP"
        assert_trains(rank["full"])
    assert losses(fsdp2[0]["full"]) == losses(fsdp2[1]["full"])  # the logged loss is the global mean


def test_an_accelerator_accumulating_otherwise_than_grad_accum_is_refused(tmp_path):
    """Before, each micro-batch stepped: --steps 12 with --grad-accum 2 ran 24 steps."""
    from accelerate import Accelerator

    from soap_apps.finetune.train import train

    cfg = accelerate_scenarios.small_config(str(tmp_path), grad_accum=2)
    with pytest.raises(ConfigError, match=r"--grad-accum 2, but the Accelerator accumulates 1 micro-batches"):
        train(cfg, Accelerator(cpu=True))  # (as ACCELERATE_GRADIENT_ACCUMULATION_STEPS=1 would build it)
    # DeepSpeed's JSON may set it in prepare() (a concrete value wins over the Accelerator's)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    prepare = accelerator.prepare

    def prepare_as_deepspeed(*objects):
        prepared = prepare(*objects)
        accelerator.gradient_accumulation_steps = 4
        return prepared

    accelerator.prepare = prepare_as_deepspeed
    with pytest.raises(ConfigError, match=r"accumulates 4 micro-batches per step .* 1 if absent"):
        train(dataclasses.replace(cfg, output_dir=str(tmp_path / "again")), accelerator)


def test_fsdp2_save_state_load_state_continues_identically(fsdp2):
    for rank in fsdp2:
        assert_resume_identical(rank["full"], rank["resumed"])


def test_ddp_trains_with_replicated_soap(ddp):
    for rank in ddp:
        first = start(rank["full"])
        assert first["world"] == 2 and first["distributed_type"] == "DistributedType.MULTI_CPU"
        assert not rank["all_dtensor"] and rank["model_params_are_optimizer_params"]
        assert rank["placement"] == "replicated" and rank["world"] == 2
        assert rank["full"][1]["soap_placement"] == "replicated"
        assert_trains(rank["full"])


@pytest.mark.parametrize("name", ["trainer_ddp", "trainer_zero2"])
def test_hf_trainer_saves_and_resumes_identically(name, spawned):
    optimizer_file = "optimizer.pt" if name == "trainer_ddp" else f"global_step{SAVE_AT}"  # DeepSpeed's
    for rank in scenario(spawned, name):
        assert optimizer_file in rank["saved"], rank["saved"]
        assert rank["resumed_steps"] == STEPS - SAVE_AT, rank  # the log's first losses: the checkpoint's
        assert len(rank["full"]) == STEPS and rank["resumed"] == rank["full"], rank
        # the held-out mean over the 13 windows, not over per-batch means padded with repeated windows
        held_out, oracle = rank["held_out"]
        assert held_out == pytest.approx(oracle, rel=1e-6), rank["held_out"]


def test_each_accelerate_backend_has_its_own_default_output_dir(ddp, fsdp2, zero2):
    for ranks, name in ((ddp, "ddp"), (fsdp2, "fsdp2"), (zero2, "deepspeed-zero2")):
        assert all(rank["backend"] == name for rank in ranks), [rank["backend"] for rank in ranks]


def test_ddp_save_state_load_state_continues_identically(ddp):
    for rank in ddp:
        assert_resume_identical(rank["full"], rank["resumed"])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ddp.yaml", {"distributed_type": "MULTI_GPU", "num_processes": 2}),
        ("fsdp2.yaml", {"distributed_type": "FSDP", "num_processes": 2}),
        ("deepspeed_zero2.yaml", {"distributed_type": "DEEPSPEED", "num_processes": 2}),
    ],
)
def test_accelerate_configs_load(name, expected):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
    assert {
        k: str(getattr(config, k)).split(".")[-1] if k == "distributed_type" else getattr(config, k)
        for k in expected
    } == expected
    if name == "fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
    if name == "deepspeed_zero2.yaml":
        ds = json.loads((REPO / config.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == 2 and "optimizer" not in ds


# ----- one process -----
def test_hf_trainer_route_trains_with_soap(tmp_path):
    from soap_apps.finetune.hf import build_trainer

    cfg = FinetuneConfig(
        steps=STEPS, batch_size=8, context=64, max_bytes=200_000, eval_every=0, fused="off",
        precondition_frequency=2, output_dir=str(tmp_path), threads=1, lr=3e-3, warmup_steps=2,
    )  # fmt: skip
    trainer = build_trainer(cfg, disable_tqdm=True, learning_rate=1e-9)  # the kwargs' lr wins, see below
    trainer.train()
    opt = trainer.optimizer
    while not isinstance(opt, SOAP):  # Accelerate's wrapper
        opt = opt.optimizer
    assert opt.stats()["placement"] == "single" and opt.stats()["refreshes"] > 0
    # the Trainer's two groups: weight decay for matrices only, from TrainingArguments
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, cfg.weight_decay]
    # optimizer_cls_and_kwargs: the schedule scales the kwargs' lr, not args.learning_rate
    assert all(g["initial_lr"] == cfg.lr for g in opt.param_groups)
    curve = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(curve) == STEPS and curve[-1] < curve[0] - 0.3, curve
    # the shared schedule (soap_apps.schedule), not HF's cosine_with_min_lr: the Trainer's 0-based
    # step s runs at the launcher's lr of step s, through LambdaLR over the optimizer's base lr
    from soap_apps.finetune.train import lr_at

    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([lr_at(cfg, s) for s in range(STEPS)], rel=1e-9)  # warmup 2, cosine
    trainer.lr_scheduler = None
    probe = torch.optim.SGD([torch.zeros(1)], lr=cfg.lr)
    scheduler = trainer.create_scheduler(cfg.steps, optimizer=probe)
    got = []
    for _ in range(cfg.steps + 2):
        got.append(probe.param_groups[0]["lr"])
        probe.step()
        scheduler.step()
    assert got == pytest.approx([lr_at(cfg, s) for s in range(cfg.steps + 2)], rel=1e-12)


def test_init_from_a_pretraining_export(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from soap_apps.finetune.train import train
    from soap_apps.pretrain.config import ModelConfig
    from soap_apps.pretrain.model import GPT, export

    mcfg = ModelConfig(vocab_size=256, seq_len=64, d_model=32, n_layers=1, n_heads=2)
    export(GPT(mcfg).state_dict(), mcfg, tmp_path / "final")
    cfg = FinetuneConfig(
        init_from=str(tmp_path / "final"), steps=4, batch_size=4, context=64, max_bytes=100_000,
        eval_every=0, eval_windows=8, fused="off", precondition_frequency=2, output_dir=str(tmp_path / "ft"),
    )  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    rows = train(cfg, Accelerator(cpu=True))
    assert sorted(losses(rows)) == [1, 2, 3, 4] and losses(rows)[4] < losses(rows)[1]
    longer = FinetuneConfig(**{**cfg.to_dict(), "context": 128, "output_dir": str(tmp_path / "ft2")})
    with pytest.raises(ValueError, match="--context=128 exceeds the exported model's context of 64"):
        train(longer, Accelerator(cpu=True))


def test_a_used_output_dir_is_refused_and_the_default_names_the_backend(tmp_path, monkeypatch):
    """A fresh run never writes into another run's --output-dir (issue 13: a ZeRO-2 run appended to a
    DDP run's metrics.jsonl); the default directory is runs/finetune-<backend>."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from soap_apps.finetune.hf import build_trainer
    from soap_apps.finetune.launch import backend_name
    from soap_apps.finetune.train import train

    monkeypatch.chdir(tmp_path)
    cfg = FinetuneConfig(
        steps=1, batch_size=2, context=32, max_bytes=20_000, eval_every=0, eval_windows=2, fused="off",
        precondition_frequency=2, threads=1,
    )  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    rows = train(cfg, Accelerator(cpu=True))
    used = tmp_path / "runs" / "finetune-single"
    assert start(rows)["config"]["output_dir"] == "runs/finetune-single"
    assert sorted(p.name for p in used.iterdir()) == ["checkpoints", "metrics.jsonl"]
    before = (used / "metrics.jsonl").read_text()
    message = (
        r"--output-dir 'runs/finetune-single' already holds a run \(checkpoints/, metrics.jsonl\); "
        r"pass --resume latest \(or --resume DIR\) to continue that run, or another --output-dir"
    )
    with pytest.raises(FileExistsError, match=message):
        train(cfg, Accelerator(cpu=True))
    assert (used / "metrics.jsonl").read_text() == before
    with pytest.raises(FileExistsError, match="already holds a run"):  # the Trainer route too
        build_trainer(FinetuneConfig(output_dir=str(used)))
    assert build_trainer(cfg, disable_tqdm=True).args.output_dir == "runs/finetune-trainer-single"
    (used.parent / "empty").mkdir()  # an empty directory is fine
    train(FinetuneConfig(**{**cfg.to_dict(), "output_dir": "runs/empty"}), Accelerator(cpu=True))
    # what accelerate launch sets up maps to the name (the Trainer route reads it before any Accelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert backend_name() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "configs/accelerate/ds_zero2.json"))
    assert backend_name() == "deepspeed-zero2"  # from the JSON
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert backend_name() == "deepspeed-zero3"


# ----- bad input -----
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "sgd"], "optimizer must be 'soap' or 'adamw', got 'sgd'"),
        (["--model", "gpt5"], "model must be 'gpt2-tiny' (or --init-from DIR), got 'gpt5'"),
        (
            ["--refresh-delay", "10"],
            "refresh_delay must be < precondition_frequency (10), got 10",
        ),
        (["--steps", "0"], "steps must be >= 1, got 0"),
        (["--fused", "maybe"], "fused must be 'auto', 'on' or 'off', got 'maybe'"),
    ],
)
def test_bad_flags_exit_with_the_flag_and_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_fsdp1_config_is_refused_and_soap_rejects_flat_parameters(monkeypatch):
    # what `accelerate launch --config_file <fsdp_version: 1 config>` puts in the environment
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match=r"fsdp_version: 2 \(see configs/accelerate/fsdp2.yaml\)"):
        check_launch(FinetuneConfig(), cuda=True)
    # torch cannot build FSDP1 on CPU ("FSDP needs a non-CPU accelerator device"); where it can, SOAP
    # meets its flat parameters at the first step and says what to use instead
    from torch.distributed.fsdp._flat_param import FlatParameter

    flat = FlatParameter(torch.zeros(12), requires_grad=True)
    opt = SOAP([flat], fused=False)
    flat.grad = torch.ones(12)
    with pytest.raises(ValueError, match=r"FSDP1 flat parameter; FSDP1 is not supported\. Use FSDP2 "):
        opt.step()


def test_fsdp_on_cpu_is_refused_instead_of_training_something_else(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(RuntimeError, match="no CUDA device is visible.*configs/accelerate/ddp.yaml"):
        check_launch(FinetuneConfig(), cuda=False)
    check_launch(FinetuneConfig(), cuda=True)  # on GPUs the same config is fine


def test_missing_data_and_checkpoints_are_named(tmp_path):
    from soap_apps.finetune.data import load_bytes

    with pytest.raises(FileNotFoundError, match="--data '/no/such/corpus' does not exist"):
        load_bytes("/no/such/corpus", 1000)
    with pytest.raises(FileNotFoundError, match="--resume latest: no checkpoints/step_N under --output-dir"):
        resume_dir(FinetuneConfig(resume="latest", output_dir=str(tmp_path)))
    for name in ("step_2", "step_10"):  # complete: with the record checkpoints.save adds last
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / MARKER).write_text("{}")
    assert resume_dir(FinetuneConfig(resume="latest", output_dir=str(tmp_path))).name == "step_10"


@pytest.mark.parametrize("world", [None, "1", "2"])
def test_deepspeed_on_cpu_skips_the_shm_build_at_any_process_count(monkeypatch, world):
    # the shm op serves only inference, and its one-time JIT build costs tens of seconds on CPU; one
    # process sets up DeepSpeed's communication too, so it is skipped there as well
    import accelerate
    import accelerate.utils

    from soap_apps.finetune import launch

    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    skipped, built = [], []
    monkeypatch.setattr(launch, "skip_deepspeed_shm_build", lambda: skipped.append(1))
    monkeypatch.setattr(launch, "deepspeed_cpu_without_probe", lambda: None)
    monkeypatch.setattr(launch, "no_deprecated_all_gather_warning", lambda: None)
    monkeypatch.setattr(accelerate.utils, "DeepSpeedPlugin", lambda **kw: ("plugin", kw))
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: built.append(kw))
    launch.make_accelerator(FinetuneConfig())
    assert skipped == [1]
    assert built[0]["deepspeed_plugin"][0] == "plugin" and not built[0].get("cpu")  # cpu=True drops it
