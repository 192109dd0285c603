"""DeepSpeed: ZeRO 0-3 at world 2 equal one-process SOAP on the same global batch.

All 2-rank scenarios share one spawned gloo group (tests/zero_scenarios.py). Gradients there are
exact (multiples of 1/8), so the one-process reference sees bitwise the same global gradient.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="the deepspeed extra is part of the test install")

import zero_scenarios as zs  # noqa: E402

from soap_dist import SOAP  # noqa: E402
from soap_dist.layout import plan_param  # noqa: E402
from soap_dist.zero_layout import Fragment, homes, routes, unit_rows  # noqa: E402

TOL = 1e-4  # the bound, fp32; measured ~1e-7

DELAY1 = {"refresh_delay": 1}
OWNER = {"placement": "owner", "block_size": None}
OWNER1 = {**OWNER, "refresh_delay": 1}
JOBS = [
    ("stage0", "scenario_stage", dict(stage=0, gas=1)),
    ("stage1", "scenario_stage", dict(stage=1, gas=1)),
    ("stage2_gas2", "scenario_stage", dict(stage=2, gas=2)),
    ("stage3_init_gas2", "scenario_stage", dict(stage=3, gas=2, zero_init=True, sub_group_size=100)),
    # a refreshed basis installed one step late; several sub-groups, so several calls per engine step
    ("stage3_delay1", "scenario_stage", dict(stage=3, gas=1, sub_group_size=100, soap_kw=DELAY1)),
    ("stage0_bf16", "scenario_stage", dict(stage=0, gas=2, bf16=True)),
    ("stage1_bf16", "scenario_stage", dict(stage=1, gas=1, bf16=True)),
    ("stage2_bf16", "scenario_stage", dict(stage=2, gas=2, bf16=True)),
    ("stage3_bf16", "scenario_stage", dict(stage=3, gas=1, bf16=True, zero_init=True)),
    # "placement": "owner": each whole matrix at one rank; equals one process with no block_size
    ("stage2_owner", "scenario_stage", dict(stage=2, gas=2, soap_kw=OWNER)),
    ("stage3_owner_delay1", "scenario_stage", dict(stage=3, gas=1, sub_group_size=100, soap_kw=OWNER1)),
    # owner with a (200, 7) "embedding" left spread on zero's rows (its column factor shared)
    ("stage2_owner_spread", "scenario_owner_spread", dict(stage=2, gas=2, soap_kw=OWNER)),
    ("stage3_owner_spread", "scenario_owner_spread", dict(stage=3, gas=1, soap_kw=OWNER1)),
    ("client_instance", "scenario_client_instance", dict(stage=2)),
    ("bad", "scenario_bad_configs", dict()),
    ("refused_load", "scenario_refused_load", dict(stage=2)),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ck = tmp_path_factory.mktemp("ds_ckpt")
    jobs = JOBS + [
        ("ckpt_stage2", "scenario_checkpoint", dict(stage=2, directory=str(ck / "s2"))),
        ("ckpt_stage3", "scenario_checkpoint", dict(stage=3, directory=str(ck / "s3"))),
        (
            "ckpt_owner_spread",
            "scenario_checkpoint",
            dict(stage=2, directory=str(ck / "spread"), soap_kw=OWNER, shapes=zs.SPREAD_SHAPES),
        ),
        ("foreign_loads", "scenario_foreign_loads", dict(stage=2, directory=str(ck / "s2"))),
    ]
    return zs.run(jobs)


WHOLE = {"block_size": None}  # a unit is a whole matrix: it can span three or four ranks' slices
JOBS4 = [
    ("stage2_whole_matrices", "scenario_stage", dict(stage=2, gas=1, soap_kw=WHOLE)),
    ("stage1_owner", "scenario_stage", dict(stage=1, gas=1, soap_kw=OWNER)),
    ("stage3_blocks", "scenario_stage", dict(stage=3, gas=1)),
]


@pytest.fixture(scope="module")
def results4():
    return zs.run(JOBS4, world=4)


@pytest.mark.parametrize("name", [j[0] for j in JOBS4])
def test_zero_at_world_4_equals_one_process(results4, name):
    for rank, res in enumerate(results4):
        r = res[name]
        assert r["error"] <= TOL, (rank, name, r["error"])
        expected = "owner" if "owner" in name else "zero"
        assert r["placement"] == expected and r["engine_steps_seen"] == [zs.STEPS - 1] * len(zs.SHAPES)
        assert r["mid_row"], r["fragments"]


@pytest.mark.parametrize("name", [j[0] for j in JOBS if j[1] == "scenario_stage"])
def test_zero_stage_equals_one_process(results, name):
    for rank, res in enumerate(results):
        r = res[name]
        assert r["error"] <= TOL, (rank, name, r["error"])
        assert r["global_steps"] == zs.STEPS
        stage = dict((j[0], j[2]) for j in JOBS)[name]["stage"]
        assert r["placement"] == ("replicated" if stage == 0 else "owner" if "owner" in name else "zero")
        if stage:
            # one update per optimizer step (not per micro-batch, not per group/sub-group call);
            # the first call only builds the preconditioner, as in the reference
            assert r["engine_steps_seen"] == [zs.STEPS - 1] * len(zs.SHAPES)
            # the partitions really cut a matrix with a row factor mid-row
            assert any("(row factor)" in m for m in r["mid_row"]), r["fragments"]
            # pieces away from home send their gradient and get their update back; values never travel
            assert sum(r["moved"]) == r["expected_moved"], (rank, name, r["moved"], r["expected_moved"])


@pytest.mark.parametrize("name", ["stage2_owner_spread", "stage3_owner_spread"])
def test_owner_with_a_spread_parameter_equals_one_process(results, name):
    for rank, res in enumerate(results):
        r = res[name]
        assert r["error"] <= TOL, (rank, name, r["error"])
        assert r["placement"] == "owner" and r["spread"] == ["w0"], (rank, r)


def test_stage3_sub_groups_are_stepped_separately(results):
    assert results[0]["stage3_init_gas2"]["flats"] > 1


def test_soap_instance_given_to_deepspeed_directly(results):
    r = results[0]["client_instance"]
    assert r["placement"] == "zero" and r["error"] <= TOL


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_round_trip_continues_bitwise(results, stage):
    assert all(res[f"ckpt_stage{stage}"]["bitwise"] for res in results)
    # held before ZeRO's runner was built, then taken by rank 0 alone (unheld: a collective timeout)
    saved_alone = results[0][f"ckpt_stage{stage}"]["saved_alone"]
    assert saved_alone == ["param_groups", "state", "zero_placement", "zero_world"], saved_alone


def test_deepspeed_checkpoint_with_a_spread_parameter_continues_bitwise(results):
    assert all(res["ckpt_owner_spread"]["bitwise"] for res in results)
    assert all(res["ckpt_owner_spread"]["spread"] == ["w0"] for res in results)


def test_bad_configs_fail_at_start_saying_what_to_do(results):
    bad = results[0]["bad"]
    assert "unknown SOAP params ['momentum']" in bad["unknown"] and "allowed" in bad["unknown"]
    assert "offload_optimizer is not supported" in bad["offload"] and "remove" in bad["offload"]
    assert "elastic_checkpoint" in bad["elastic"] and "false" in bad["elastic"]
    assert "fp16 at ZeRO stage 0 is not supported" in bad["fp16_stage0"] and "bf16" in bad["fp16_stage0"]
    assert "fp16 at ZeRO stage 0 is not supported" in bad["fp16_wrapper"], bad["fp16_wrapper"]
    assert "placement='owner' does not fit ZeRO stage 0" in bad["owner_stage0"], bad["owner_stage0"]
    assert "placement='replicated' does not fit ZeRO stage 2" in bad["replicated_stage2"]
    assert "param group 1 holds no trainable parameter" in bad["frozen_group_stage1"]
    assert "'zero'" not in bad["replicated_stage2"]  # not a value SOAP takes ("auto" runs it)
    assert bad["empty_group_stage1"] == bad["bf16_fp16_auto_stage0"] == "no error", bad


def test_states_from_another_setup_are_refused_naming_the_difference(results):
    for res in results:  # every rank says the same
        r = res["foreign_loads"]
        assert "saved with placement 'zero'" in r["placement"] and '"placement": "auto"' in r["placement"]
        assert "not saved under DeepSpeed ZeRO stages 1-3" in r["whole"], r["whole"]
        assert "got None" in r["none"] and "load_optimizer_states=False" in r["none"], r["none"]


def test_reference_is_sensitive_to_blocking():
    """The tolerance means something: unblocked SOAP differs from the block_size=4 reference."""
    assert zs.rel(zs.reference(zs.STEPS, 1, block_size=None), zs.reference(zs.STEPS, 1)) > 100 * TOL


def test_flat_partitions_without_a_zero_optimizer_are_refused():
    import deepspeed  # noqa: F401  (what makes SOAP look for a ZeRO optimizer)

    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = SOAP([w])
    flat = torch.nn.Parameter(torch.randn(6))
    flat.grad = torch.randn(6)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="soap_dist.deepspeed.initialize"):
        opt.step()
    assert "deepspeed" in sys.modules


# ----- zero_layout: pure, every boundary -----
def _layout(shape, block_size, max_precond_dim=20):
    return plan_param(
        0, 0, "w", shape, max_precond_dim=max_precond_dim, merge=False, precondition_1d=False,
        data_format="channels_first", block_size=block_size,
    )  # fmt: skip


def _cuts(numel, world, rng):
    points = sorted(rng.randint(0, numel) for _ in range(world - 1))
    bounds = [0, *points, numel]
    return [(bounds[r], bounds[r + 1] - bounds[r]) for r in range(world)]


@pytest.mark.parametrize("shape,block_size", [((17, 7), 4), ((17, 7), None), ((30, 7), 4), ((9,), None)])
def test_homes_cover_each_row_once_in_whole_units_by_majority(shape, block_size):
    rng = random.Random(0)
    lay = _layout(shape, block_size)
    unit = unit_rows(lay, normalize_grads=False)
    rows = shape[0]
    width = shape[1] if len(shape) > 1 else 1
    for world in (2, 3, 4):
        for _ in range(50):
            held = _cuts(rows * width, world, rng)
            got = homes(lay, unit, held)
            assert sum(c for _, c in got) == rows
            nonempty = [(s, c) for s, c in got if c]
            assert all(a[0] + a[1] == b[0] for a, b in zip(nonempty, nonempty[1:], strict=False))
            for r, (first, count) in enumerate(got):
                if count:
                    assert first % unit == 0 and (count % unit == 0 or first + count == rows)
                    for u0 in range(first, first + count, unit):
                        lo, hi = u0 * width, min(u0 + unit, rows) * width
                        share = [max(0, min(hi, s + n) - max(lo, s)) for s, n in held]
                        assert share[r] == max(share) and share.index(max(share)) == r


def test_unit_is_a_row_block_only_when_rows_have_a_factor():
    assert unit_rows(_layout((17, 7), 4), False) == 4
    assert unit_rows(_layout((17, 7), None), False) == 17
    assert unit_rows(_layout((30, 7), 4), False) == 1  # 30 > max_precond_dim: no row factor
    assert unit_rows(_layout((30, 7), 4), True) == 4  # normalize_grads works per block


def test_routes_match_between_holders_and_homes():
    rng = random.Random(1)
    lay = _layout((17, 7), 4)
    world = 3
    held = _cuts(17 * 7, world, rng)
    frags = [[Fragment(0, s, n, 5)] if n else [] for s, n in held]
    splits = {0: homes(lay, 4, held)}
    per_rank = [routes([lay], [0], frags, splits, me) for me in range(world)]
    crossing = {c for _, c in per_rank}
    assert len(crossing) == 1
    for me, (route, _) in enumerate(per_rank):
        for other in range(world):
            assert route.send[other] == per_rank[other][0].recv[me]
    moved = sum(
        p.numel
        for me, (route, _) in enumerate(per_rank)
        for d, ps in enumerate(route.send)
        if d != me
        for p in ps
    )
    assert moved == crossing.pop()


def test_initialize_drops_only_deepspeeds_untested_optimizer_banner(caplog):
    import logging

    import soap_dist.deepspeed as sdd

    logger = logging.getLogger("DeepSpeed")
    with caplog.at_level(logging.WARNING, logger="DeepSpeed"):
        with sdd._without_untested_banner():
            logger.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
            logger.warning("something else")
        logger.warning("You are using ZeRO with an untested optimizer (outside initialize)")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "something else",
        "You are using ZeRO with an untested optimizer (outside initialize)",
    ]


def test_json_values_are_named_when_wrong():
    """A JSON's dtype names and the ZeRO stage are checked with SOAP's and the plugin's messages."""
    from soap_dist.deepspeed import check_config, soap_from_config

    with pytest.raises(ValueError, match=r"zero_optimization.stage='two'; expected 0, 1, 2 or 3"):
        check_config({"zero_optimization": {"stage": "two"}})
    shipped = json.loads((Path(__file__).parents[1] / "configs" / "deepspeed" / "zero2.json").read_text())
    with pytest.raises(ValueError, match='train_micro_batch_size_per_gpu, .* = "auto" in the config'):
        check_config(shipped)  # DeepSpeed itself raised a TypeError comparing "auto" with an int
    params = [torch.nn.Parameter(torch.zeros(3, 3))]

    def soap(**given):
        return soap_from_config({"optimizer": {"type": "SOAP", "params": given}}, params)[0]

    assert soap(factor_dtype="fp64").factor_dtype == torch.float64  # DeepSpeed's own spelling too
    with pytest.raises(ValueError, match=r"factor_dtype='device' in the config's optimizer params; use"):
        soap(factor_dtype="device")  # was looked up on torch: "invalid factor_dtype=<class 'torch.device'>"
    with pytest.raises(ValueError, match="unknown SOAP params \\['device_mesh'\\]"):
        soap(device_mesh="mesh")  # an object, not JSON
    with pytest.raises(ValueError, match='"params" must be an object'):
        soap_from_config({"optimizer": {"type": "SOAP", "params": [0.01]}}, params)
    with pytest.raises(ValueError, match="invalid betas=0.9"):
        soap_from_config({"optimizer": {"type": "SOAP", "params": {"betas": 0.9}}}, params)
    soap, _ = soap_from_config({"optimizer": {"type": "SOAP", "params": {"basis_dtype": "bfloat16"}}}, params)
    assert soap.basis_dtype == torch.bfloat16


def test_a_load_refused_on_one_rank_is_refused_on_every_rank_with_nothing_copied(results):
    """ZeRO loads in place: before, the rank whose partition fitted copied the state in, and the
    refusing rank had already overwritten its earlier parameters' step counts and moments. The
    narrow row factor failed inside the copy itself (a RuntimeError on rank 1 alone)."""
    for case, found in (("moments", "exp_avg of"), ("narrow", "holds a block of shape")):
        errors = [r["refused_load"][case]["error"] for r in results]
        assert found in errors[1], (case, errors)
        assert "other ranks refused the checkpoint: rank 1" in errors[0], (case, errors)
        for r in results:
            assert r["refused_load"][case]["unchanged"] and r["refused_load"][case]["lr"] != 0.5, case
