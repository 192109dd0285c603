"""Issue 12's faults on 2 gloo ranks: one decision or one clear error on every rank, never a silent
divergence or a hang (tests/reliability_scenarios.py; docs/design.md, "Failure behaviour")."""

from __future__ import annotations

import pytest
import reliability_scenarios as rs
import torch

from soap_dist import SOAP

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def shared():
    return rs.run([f.__name__ for f in rs.SHARED])


def _ok(ranks, name):
    for r, res in enumerate(ranks):
        assert "exception" not in res[name], f"rank {r}:\n{res[name]['exception']}"
    return [res[name] for res in ranks]


def test_swapped_parameters_fail_the_plan_check_naming_the_parameter(shared):
    for res in _ok(shared, "swapped_params"):
        assert res["plain"].startswith("PlanMismatchError") and "parameter 0" in res["plain"], res["plain"]
        assert "fingerprint" in res["plain"]
        assert res["named"].startswith("PlanMismatchError") and "parameter 0 (w" in res["named"], res["named"]


def test_an_option_of_the_plan_differing_between_ranks_is_named(shared):
    for res in _ok(shared, "refresh_delay_differs"):
        error = res["error"]
        assert error.startswith("PlanMismatchError: SOAP: ranks disagree on the block/factor plan"), error
        assert "in refresh_delay: [0, 1] (by rank)" in error and "shape" not in error, error


def test_a_nan_on_one_replica_is_skipped_on_every_replica(shared):
    for res in _ok(shared, "nan_on_one_replica"):
        assert res["same"] and res["finite"] and res["moved_others"] and res["skipped_on_every_rank"]


def test_a_frequency_changed_on_one_rank_is_an_error_on_every_rank(shared):
    for res in _ok(shared, "frequency_changed"):
        error = res["error"]
        assert error.startswith("RanksDisagreeError"), error
        assert "precondition_frequency: [3, 2]" in error and "optimizer step" in error
        assert res["broken"] is None  # nothing was applied: no rank refuses, no notice was posted


def test_unsynchronised_gradients_are_named(shared):
    for res in _ok(shared, "unsynced_gradients"):
        error = res["error"]
        assert error.startswith("RanksDisagreeError"), error
        assert "gradients of param_groups[0].params[1] (shape (6, 4)) differ" in error, error
        assert "params[0]" not in error, error
        assert "wrap the model in DDP after setting requires_grad" in error, error


def test_a_compile_failing_on_one_rank_is_an_error_on_every_rank(shared):
    for res in _ok(shared, "compile_failed_on_one_rank"):
        for error in (res["error"], res["hsdp_error"]):  # replicated, and HSDP's replicas of a shard
            assert error.startswith("RanksDisagreeError"), error
            assert "fused (the compiled elementwise step): [True, False]" in error, error
            assert "pass fused=False on every rank" in error and "gradients" not in error, error
    owner = [res["owner_error"] for res in _ok(shared, "compile_failed_on_one_rank")]
    assert owner == ["", ""], owner  # under owner only the updating rank tries: no agreement needed
    assert sorted(res["owner_fused"] for res in _ok(shared, "compile_failed_on_one_rank")) == [False, True]


def test_a_gradient_missing_on_one_rank_is_named_under_every_placement(shared):
    for by_placement in _ok(shared, "gradient_missing_on_one_rank"):
        for placement, res in by_placement.items():
            error = res["error"]
            assert error.startswith("RanksDisagreeError") and "has no gradient" in error, (placement, error)
            assert "on ranks [1]" in error and "gradients differ" not in error, (placement, error)
            hint = "find_unused_parameters" if placement == "replicated" else "under FSDP2 and DeepSpeed"
            assert hint in error, (placement, error)
            # raised before anything of the step: the parameters as they were, no rank refusing
            assert res["unchanged"] and res["broken"] is None, (placement, res)


def test_a_held_state_dict_serves_one_rank_alone(shared):
    for res in _ok(shared, "held_state_dict"):
        assert res["same"] and res["taken"] and res["dropped_at_step"], res


def test_a_corrupt_shard_on_one_rank_is_refused_on_every_rank(shared):
    errors = [res["error"] for res in _ok(shared, "corrupt_shard")]
    found = [r for r, e in enumerate(errors) if "corrupt" in e and "exp_avg" in e and "refused" not in e]
    assert len(found) == 1, errors  # the rank the bad rows reach (the parameter's owner) names the key
    other = errors[1 - found[0]]
    assert "other ranks refused" in other and f"rank {found[0]}" in other and "exp_avg" in other, other


@pytest.mark.slow
def test_only_rank_0_stepping_times_out_naming_the_collective_step_and_rank():
    ranks = rs.run(["only_rank0_steps"])
    error = _ok(ranks, "only_rank0_steps")[0]["error"]
    assert error.startswith("CollectiveTimeout"), error
    assert "finite-flag all_reduce of optimizer step 3" in error and "ranks [1] did not arrive" in error


@pytest.mark.slow
def test_a_refresh_exception_caught_by_the_user_ends_in_errors_not_a_hang():
    """The waiting rank stops within seconds with rank 0's own error, not after collective_timeout."""
    ranks = rs.run(["refresh_raised_and_was_caught"])
    zero, one = _ok(ranks, "refresh_raised_and_was_caught")
    assert zero["errors"][0].startswith("RuntimeError: injected"), zero
    assert "raised in optimizer step 4 after that step's collectives had begun" in zero["errors"][1], zero
    assert one["errors"][0].startswith("PeerFailed") and "basis broadcast" in one["errors"][0], one
    assert "rank 0's step() raised in its optimizer step 4" in one["errors"][0]
    assert "injected: out of memory in the refresh" in one["errors"][0]
    assert "raised in optimizer step 4" in one["errors"][1], one  # it refuses to go on as well
    assert one["longest_step_s"] < rs.NOTICED_TIMEOUT_S / 3, one


def test_a_failure_in_one_optimizer_stops_the_waits_in_another():
    ranks = rs.run(["a_failure_in_one_optimizer_stops_waits_in_another"])
    zero, one = _ok(ranks, "a_failure_in_one_optimizer_stops_waits_in_another")
    assert zero["errors"] == ["RuntimeError: injected: out of memory in the first optimizer"], zero
    assert len(one["errors"]) == 1 and one["errors"][0].startswith("PeerFailed"), one
    assert "all_reduce of optimizer step 3 cannot complete" in one["errors"][0], one  # in the second
    assert "rank 0's step() raised in its optimizer step 3" in one["errors"][0], one
    assert "injected: out of memory in the first optimizer" in one["errors"][0], one
    assert one["longest_step_s"] < rs.NOTICE_WAIT_S, one


def test_a_healthy_peer_slower_than_a_wait_slice_does_not_end_the_step():
    ranks = rs.run(["a_peer_slower_than_a_wait_slice"])
    assert all(res["same"] for res in _ok(ranks, "a_peer_slower_than_a_wait_slice"))


def test_a_raise_before_any_collective_leaves_the_rank_free_to_step_again():
    ranks = rs.run(["raised_before_any_collective_and_stepped_again"])
    for rank, res in enumerate(_ok(ranks, "raised_before_any_collective_and_stepped_again")):
        assert res["errors"] == (["ValueError: injected: before the gather"] if rank == 0 else []), res
        assert res["same_as_clean"], res


@pytest.mark.slow
def test_an_async_refresh_finish_that_raises_ends_in_errors_not_a_hang():
    """The finish runs at the start of the next step, outside the refresh: it must still refuse."""
    ranks = rs.run(["async_finish_raised_and_was_caught"])
    zero, one = _ok(ranks, "async_finish_raised_and_was_caught")
    assert zero["errors"][0].startswith("RuntimeError: injected"), zero
    assert "raised in optimizer step 5" in zero["errors"][1], zero
    assert one["errors"] and one["errors"][0].startswith("PeerFailed"), one
    assert "injected: out of memory in the finish" in one["errors"][0], one
    assert one["longest_step_s"] < rs.NOTICED_TIMEOUT_S / 3, one


@pytest.mark.slow
def test_state_dict_on_rank_0_only_fails_with_the_rule_before_any_collective():
    ranks = rs.run(["save_on_rank0_only"])
    results = _ok(ranks, "save_on_rank0_only")
    error = results[0]["error"]
    assert error.startswith("CollectiveTimeout") and "ranks [1] did not call it" in error, error
    assert "if rank == 0: torch.save(sd, path)" in error
    # the failed rendezvous left no rank's count ahead: a later save on every rank works
    assert [r["saved_after"] for r in results] == ["", ""], results


def test_collective_timeout_is_validated():
    with pytest.raises(ValueError, match="collective_timeout"):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2))], collective_timeout=0)


def test_a_refused_load_leaves_the_optimizer_as_it_was_on_every_rank(shared):
    for res in _ok(shared, "corrupt_shard"):
        assert res["kept"] and res["lr"] == 0.02 and set(res["steps"]) == {3}, (
            res
        )  # 4 calls: the first only starts


def test_frozen_parameters_round_trip_through_dcp_and_a_foreign_state_is_named(shared):
    """DCP's set leaves frozen parameters' entries out (before, SOAP refused the state on every rank); an
    AdamW state is named as not SOAP's (before: a bare KeyError), and the optimizer steps on."""
    for res in _ok(shared, "frozen_and_foreign_states"):
        assert res["loaded"] == "" and res["bitwise"], res
        error = res["adamw"]["error"]
        assert error.startswith("ValueError") and "is not a SOAP state" in error, error
        assert res["adamw"]["stepped"], res
