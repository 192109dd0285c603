"""Placement "owner" (FSDP2 and HSDP) against one process on the same global batch, in float64.

The scenarios run in the spawned gloo worlds of dist_scenarios (tests/owner_scenarios.py).
"""

from __future__ import annotations

import pytest
from conftest import result

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("world", [2, 4])
def test_owner_equals_one_process_without_a_block_size_requirement(world, world2, world4):
    res = result(world2 if world == 2 else world4, "owner_exact")
    assert res["placement"] == "owner"
    # delay 1 against one process with delay 1; the async refresh against the synchronous one
    for name in ("b_none", "b_none_delay1", "b3", "b3_delay1", "b3_delay1_async"):
        assert res[f"rel_{name}"] <= 1e-10, (name, res)


@pytest.mark.parametrize("world", [2, 4])
def test_owner_with_a_spread_parameter_equals_one_process(world, world2, world4):
    res = result(world2 if world == 2 else world4, "owner_spread_exact")
    assert res["spread"] == [2]  # the (200, 6) "embedding": its rows stay where FSDP2 put them
    assert res["spread_names"] == ["param_groups[0].params[2]"]  # as stats() names it
    assert res["spread_normalized"] == [] and res["rel_normalized"] <= 1e-10, res
    assert "normalize_grads=True, set after the first step" in res["normalized_later"], res
    for name in ("b_none", "b_none_delay1", "b3", "b3_delay1", "b3_delay1_async"):
        assert res[f"rel_{name}"] <= 1e-10, (name, res)


def test_auto_picks_again_at_add_param_group_and_the_state_moves_across(world2):
    res = result(world2, "auto_switch_on_add_param_group")
    assert res["to_owner"][:2] == ["fsdp-local", "owner"] and res["to_owner"][2] <= 1e-10, res
    assert res["to_fsdp_local"][:2] == ["owner", "fsdp-local"] and res["to_fsdp_local"][2] <= 1e-10, res


def test_auto_switching_into_hsdp_at_add_param_group_is_refused_on_every_rank(world4):
    result(world4, "auto_switch_into_hsdp_is_refused")  # no rank raised anything else
    for res in world4:
        error = res["auto_switch_into_hsdp_is_refused"]["error"]
        assert "placement='auto' picks 'hsdp'" in error and "pass placement='owner'" in error, error


def test_owner_under_hsdp_2x2_equals_one_process_and_replicas_agree(world4):
    res = result(world4, "owner_hsdp")
    assert res["placement"] == "owner"
    names = ("b_none", "b3_delay1", "spread_b3_delay1", "spread_b3_delay1_async")
    for name in names + ("shard_group_b_none", "shard_group_spread_b3_delay1"):
        assert res[f"rel_{name}"] <= 1e-10 and res[f"same_{name}"], (name, res)
    assert res["spread_b_none"] == [] and res["spread_spread_b3_delay1"] == [2]
    assert res["spread_shard_group_spread_b3_delay1"] == [2]
    assert res["grid_b_none"] == [2, 2] and res["grid_shard_group_b_none"] == [1, 2]  # stats()


def test_owner_under_hsdp_holds_each_byte_of_state_once_over_the_mesh(world4):
    """owner_scope="world": state 1/W over all four ranks; "shard_group": once per replica."""
    res = result(world4, "owner_hsdp")
    total = res["single_total"]
    assert sum(res["state_b_none"]) == total
    assert max(res["state_b_none"]) <= 1.25 * total / 4 + res["largest"]
    assert sum(res["state_shard_group_b_none"]) == 2 * total
    assert max(res["state_b_none"]) < max(res["state_shard_group_b_none"])


def test_ranks_that_disagree_on_owner_scope_stop_with_a_plan_mismatch(world4):
    for rank in world4:
        error = rank["owner_scope_mismatch"]["error"]
        assert error.startswith("PlanMismatchError: SOAP: ranks disagree on the block/factor plan"), error
        assert "owner_scope: ['world', 'world', 'world', 'shard_group'] (by rank)" in error, error


def test_hsdp_replicas_holding_other_tensors_stop_at_the_plan_check(world4):
    for rank in world4:
        for case, error in rank["hsdp_replicas_hold_other_tensors"].items():
            if case.endswith(("_swap", "_replica")):  # a whole replica differing passed (the verdict alike)
                assert error.startswith("PlanMismatchError: SOAP: ranks hold different tensors"), case
                assert "between the replicas" in error, (case, error)
            else:  # a count that differs is named as such (the replica check must not collide first)
                assert "ranks have different parameter counts [2, 2, 2, 1]" in error, (case, error)


def test_gradients_that_differ_between_hsdp_replicas_stop_every_rank(world4):
    for rank in world4:
        errors = rank["hsdp_replicas_gradients_differ"]
        for case in ("hsdp_world", "owner_world"):
            error = errors[case]
            assert error.startswith("RanksDisagreeError"), (case, error)
            assert "differ between replicas" in error, (case, error)
            assert "gradients of param_groups[0].params[1]" in error and "params[0]" not in error, error
            assert "FSDP2's all-reduce across the replicas" in error, (case, error)
        assert errors["owner_shard_group"] == "", errors  # each replica decides alone (docs/design.md)


def test_owner_under_hsdp_checkpoint_continues_and_reshards(world4):
    res = result(world4, "owner_hsdp_checkpoint")
    assert res["spread"] == [0], res  # the (200, 6) embedding: rows cut among shards and replicas
    assert {2, 3} & set(res["owners"]), res  # owners beyond the first replica's shard group
    assert res["restored_steps"] == [6] and res["bitwise"], res
    for name in ("shard_group", "fsdp4", "single"):
        assert res[f"rel_{name}"] <= 1e-10, (name, res)


@pytest.mark.parametrize("world", [2, 4])
def test_owner_state_per_rank_shrinks_as_one_over_w(world, world2, world4):
    ranks = world2 if world == 2 else world4
    res = result(ranks, "owner_state_and_traffic")
    assert sum(res["state"]) == res["single_total"]  # every byte of state exists exactly once
    assert max(res["state"]) <= 1.25 * res["single_total"] / world + res["largest"]
    assert all(r["owner_state_and_traffic"]["owned_params"] > 0 for r in ranks)


@pytest.mark.parametrize("world", [2, 4])
def test_owner_step_traffic_equals_the_formula(world, world2, world4):
    for rank in world2 if world == 2 else world4:
        res = rank["owner_state_and_traffic"]
        assert "exception" not in res, res.get("exception")
        assert res["sent"] == res["formula_sent"]
        assert res["received"] == res["formula_received"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_owner_narrow_values_travel_as_gradients_and_updates(dtype, world2):
    """float32 values with float64 factors, bf16 values with float32 factors."""
    for rank in world2:
        res = rank["owner_narrow_values"]
        assert "exception" not in res, res.get("exception")
        res = res[dtype]
        assert res["dtypes"] == [f"torch.{dtype}"]
        # the same arithmetic as one process, element by element (measured: bitwise)
        assert res["rel"] <= 1e-6, res
        assert res["sent_last"] == res["formula_sent"]  # gradients in the values' dtype, updates wider


def test_owner_bad_input_fails_with_a_message_on_every_rank(world2):
    for rank in world2:
        res = rank["owner_errors"]
        assert "exception" not in res, res.get("exception")
        assert "placement='owner' needs FSDP2" in res["plain"]
        assert "Shard(dim=1)" in res["shard1"] and "owner" in res["shard1"]
        assert res["mismatch"].startswith("PlanMismatchError"), res["mismatch"]
        assert res["missing"].startswith("PlanMismatchError"), res["missing"]
        assert (
            "different parameter counts [2, 1]" in res["missing"] and "missing on ranks [1]" in res["missing"]
        )
        assert "torch.bfloat16 gradient for torch.float32 values" in res["grad_dtype"], res["grad_dtype"]


@pytest.mark.parametrize("prefix", ["", "spread_", "staggered_"], ids=["whole", "spread", "staggered"])
def test_owner_dcp_round_trip_continues_bitwise_at_world_2(prefix, world2):
    res = result(world2, "owner_checkpoint")
    assert res[f"{prefix}placement"] == "owner"
    assert res[f"{prefix}spread"] == ([0] if prefix == "spread_" else [])  # the second model's embedding
    assert res[f"{prefix}restored_steps"] == [6]
    assert res[f"{prefix}bitwise"]


def test_owner_full_state_dict_round_trips_and_loads_in_one_process(world2):
    """DCP's consolidated form (full_state_dict=True): full tensors on rank 0, spread state included."""
    res = result(world2, "owner_full_state_dict")
    assert res["spread"] == [0] and res["bitwise"], res
    assert res["rel_single"] <= 1e-10, res
    assert res["flat_bitwise"], res  # before, the flattened state lost every key on load


@pytest.mark.parametrize("prefix", ["", "spread_", "staggered_"], ids=["whole", "spread", "staggered"])
def test_owner_checkpoint_reshards_to_world_4_and_to_one_process(prefix, world4):
    """Staggered too: the checkpoint's phases (world 2's owners') continue the run at any world size."""
    res = result(world4, "owner_checkpoint")
    assert res[f"{prefix}spread"] == ([0] if prefix == "spread_" else [])
    assert res[f"{prefix}restored_steps"] == [6]
    assert res[f"{prefix}rel_world4"] <= 1e-10
    assert res[f"{prefix}rel_single"] <= 1e-10
    if prefix == "staggered_":
        computed, loaded = res["staggered_single_phases"]
        assert computed != loaded and loaded == res["staggered_phases"], res  # the test can fail


@pytest.mark.parametrize("world", [2, 4])
def test_planner_counts_equal_stats_on_every_rank(world, world2, world4):
    ranks = world2 if world == 2 else world4
    result(ranks, "planner_counts")
    for r, rank in enumerate(ranks):
        for name, res in rank["planner_counts"].items():
            assert res["placement"] == name.split("_")[0]
            assert res["stats"] == res["counted"], (r, name, res)
            assert res["traffic"] == res["counted_traffic"], (r, name, res)
    assert set(ranks[0]["planner_counts"]) == (
        {"replicated", "fsdp-local", "owner", "owner_spread"}
        | ({"hsdp", "owner_hsdp_spread", "owner_hsdp_shard_group"} if world == 4 else set())
    )


def test_auto_picks_owner_when_the_column_state_exceeds_the_shard_or_blocks_are_the_shards(world2):
    res = result(world2, "auto_choice")
    assert res["wide"] == "owner"
    assert res["narrow"] == "fsdp-local"  # block_size divides the shards' rows: exact, and cheaper
    assert res["unblocked"] == "owner"  # fsdp-local's blocks would be the shards: not one process's
    assert res["across"] == "owner"


@pytest.mark.parametrize("world", [2, 4])
def test_staggered_refresh_under_owner_equals_the_oracle_with_the_same_phases(world, world2, world4):
    res = result(world2 if world == 2 else world4, "owner_staggered")
    assert res["staggered"] and res["rel"] <= 1e-9, res
    for rank in range(world):  # each owner spreads its own parameters over the phases
        mine = [p for p, o in zip(res["phases"][:6], res["owners"][:6], strict=True) if o == rank]
        assert len(set(mine)) == min(len(mine), 3), (rank, mine)


def test_a_gradient_too_large_for_the_factors_is_judged_whole_not_per_shard(world2):
    res = result(world2, "owner_gradient_too_large_across_shards")
    assert res == {"finite": True, "skipped": 1, "failures": 0}, res
