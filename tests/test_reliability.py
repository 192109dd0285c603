"""Issue 12's faults on 2 gloo ranks: one decision or one clear error on every rank, never a silent
divergence or a hang (tests/reliability_scenarios.py; docs/design.md, "Failure behaviour")."""

from __future__ import annotations

import time

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
        error = res["error"]
        assert error.startswith("RanksDisagreeError"), error
        assert "fused (the compiled elementwise step): [True, False]" in error, error
        assert "pass fused=False on every rank" in error, error
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


class _RecordingWork:
    """A stand-in for a collective's Work that records how it was waited on."""

    def __init__(self):
        self.calls = []

    def wait(self, **kwargs):
        self.calls.append(kwargs)
        return True


def test_collectives_wait_on_the_host_only_off_a_gpu_or_when_nccl_blocks(monkeypatch):
    from datetime import timedelta

    from soap_dist.comm.guard import BLOCKING_WAIT_VARIABLES, Guard, host_waits_for

    for name in BLOCKING_WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert host_waits_for(torch.device("cpu"))
    assert not host_waits_for(torch.device("cuda", 0))  # NCCL's wait(timeout) would block the host
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "1")
    assert host_waits_for(torch.device("cuda", 0))  # NCCL blocks anyway: SOAP's message then applies
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "True")  # torch's words, in any case
    assert host_waits_for(torch.device("cuda", 0))
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "0")  # the newer name decides, as in torch
    monkeypatch.setenv("NCCL_BLOCKING_WAIT", "1")
    assert not host_waits_for(torch.device("cuda", 0))
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT")
    assert host_waits_for(torch.device("cuda", 0))

    from soap_dist.comm.guard import unheeded_timeout

    assert unheeded_timeout(torch.device("cuda", 0), 60.0) is None  # NCCL blocks: SOAP's timeout applies
    monkeypatch.delenv("NCCL_BLOCKING_WAIT")
    assert "collective_timeout=60 s does not apply on CUDA" in unheeded_timeout(torch.device("cuda", 0), 60.0)
    assert unheeded_timeout(torch.device("cuda", 0), 600.0) is None  # the default: nothing to say
    assert unheeded_timeout(torch.device("cpu"), 60.0) is None
    assert unheeded_timeout(torch.device("cuda", 0), 60.0, "gloo") is None  # gloo waits on the host
    cuda = torch.device("cuda", 0)
    assert host_waits_for(cuda, "gloo") and not host_waits_for(cuda, "nccl")

    stream_ordered, on_host = _RecordingWork(), _RecordingWork()
    Guard(5.0, host_waits=False).wait(stream_ordered, "x", [0, 1])
    Guard(5.0, host_waits=True).wait(on_host, "x", [0, 1])
    assert stream_ordered.calls == [{}]  # no timeout: the current stream waits, the host goes on
    assert len(on_host.calls) == 1 and timedelta(seconds=4.9) < on_host.calls[0]["timeout"] <= timedelta(
        seconds=5
    )


def test_cpu_shards_under_an_nccl_only_group_are_refused_naming_the_fix(monkeypatch):
    """FSDP2's CPUOffloadPolicy puts the shards on the CPU; an NCCL-only group cannot move them."""
    import torch.distributed as dist

    from soap_dist.comm import Groups
    from soap_dist.comm.backends import backend_for, check_backend_serves

    configs = {"world": "cuda:nccl", "shard": "cpu:gloo,cuda:nccl"}
    world, shard = object(), object()
    monkeypatch.setattr(
        dist, "get_backend_config", lambda group: configs["world" if group is world else "shard"]
    )
    groups = Groups(world=world, shard=shard, replicate=None, ranks=[0, 1])
    with pytest.raises(ValueError, match=r"world process group's backend is 'cuda:nccl'.*cpu:gloo,cuda:nccl"):
        check_backend_serves(groups, torch.device("cpu"))
    check_backend_serves(groups, torch.device("cuda", 0))
    configs["world"] = "cpu:gloo,cuda:nccl"
    check_backend_serves(groups, torch.device("cpu"))
    assert backend_for(world, torch.device("cuda", 0)) == "nccl"
    assert backend_for(world, torch.device("cpu")) == "gloo"


class _GlooLikeWork:
    """A Work whose first ``failures`` waits fail like gloo's: after the whole timeout ("Operation timed
    out!"), or at once when ``early`` (a peer's connection closed); then it completes."""

    def __init__(self, failures: int, early: bool = False):
        self.failures, self.early, self.waits = failures, early, []

    def wait(self, timeout):
        self.waits.append(timeout.total_seconds())
        if len(self.waits) <= self.failures:
            if not self.early:
                time.sleep(timeout.total_seconds())
            raise RuntimeError("Connection closed by peer" if self.early else "Operation timed out!")
        return True


@pytest.fixture
def store_as_rank(monkeypatch):
    """A one-process store for comm.guard, and a function that sets which rank this process is."""
    import torch.distributed as dist

    from soap_dist.comm import guard

    store, me = dist.HashStore(), [0]
    monkeypatch.setattr(guard, "_store", lambda: store)
    monkeypatch.setattr(guard, "NOTICE_POLL_S", 0.05)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: me[0])

    def be(rank: int) -> None:
        me[0] = rank

    return be


def test_gloo_waits_in_slices_and_a_peers_failure_notice_ends_the_wait(store_as_rank):
    from soap_dist.comm.guard import CollectiveTimeout, Guard, PeerFailed

    guard = Guard(30.0, rewaits=True, ranks=[0, 1, 2])
    slow = _GlooLikeWork(3)
    guard.wait(slow, "x", [0, 1])  # a slow peer: waited again, slice by slice, until it completes
    assert len(slow.waits) == 4 and max(slow.waits) <= 0.05, slow.waits

    store_as_rank(1)
    guard.step = 7
    guard.post_failure(7, "RuntimeError: out of memory")
    guard.post_failure(7, "PeerFailed: rank 2's ...")  # the first notice stays: the root cause
    guard.wait(_GlooLikeWork(2), "x", [0, 1])  # a rank does not read its own notice ...
    store_as_rank(0)
    never = _GlooLikeWork(10**6)
    began = time.monotonic()
    with pytest.raises(
        PeerFailed, match=r"the basis broadcast of optimizer step 7 cannot complete: rank 1's"
    ) as e:
        guard.wait(never, "basis broadcast", [0, 1])  # ... the others do, after one slice
    assert "rank 1: RuntimeError: out of memory" in str(e.value) and isinstance(e.value, CollectiveTimeout)
    assert len(never.waits) == 1 and time.monotonic() - began < 5

    with pytest.raises(PeerFailed, match="rank 1: RuntimeError: out of memory"):  # any collective of
        guard.wait(_GlooLikeWork(10**6), "replica all_reduce", [0, 2])  # the exchange: the run must restart


def test_failure_notices_stay_within_their_exchanges_ranks(store_as_rank, monkeypatch):
    """Optimizers over other groups (data parallel beside tensor parallel) build guards with the
    same ids on their ranks: a failure in one group says nothing to the other."""
    import itertools

    from soap_dist.comm import guard as guard_module

    guards = []
    for ranks in ([0, 1], [2, 3]):
        monkeypatch.setattr(guard_module, "_guards", itertools.count(50))
        guards.append(guard_module.Guard(30.0, rewaits=True, ranks=ranks))
    assert guards[0].id == guards[1].id
    store_as_rank(0)
    guards[0].post_failure(4, "RuntimeError: boom")
    store_as_rank(3)
    guards[1].wait(_GlooLikeWork(2), "x", [2, 3])
    store_as_rank(1)
    with pytest.raises(guard_module.PeerFailed, match="rank 0: RuntimeError: boom"):
        guards[0].wait(_GlooLikeWork(10**6), "x", [0, 1])


def test_a_wait_that_breaks_early_is_not_waited_again(store_as_rank):
    from soap_dist.comm.guard import CollectiveTimeout, Guard

    broken = _GlooLikeWork(10**6, early=True)
    with pytest.raises(CollectiveTimeout, match=r"ranks \[1\] did not arrive.*Connection closed by peer"):
        Guard(0.5, rewaits=True).wait(broken, "x", [0, 1])
    assert len(broken.waits) == 1


def test_a_wait_that_broke_early_with_the_store_gone_says_so(store_as_rank, monkeypatch):
    """A peer that died on the node hosting the store: the wait breaks at once, and which ranks are
    missing cannot be read. Before, the message claimed the whole timeout and blamed every rank."""
    from soap_dist.comm.guard import CollectiveTimeout, Guard

    monkeypatch.setattr(Guard, "missing", lambda self, name, participants: None)
    with pytest.raises(CollectiveTimeout) as e:
        Guard(20.0, rewaits=True).wait(_GlooLikeWork(10**6, early=True), "x", [0, 1])
    text = str(e.value)
    assert "broke off after 0." in text and "did not complete in 20 s" not in text, text
    assert "the rendezvous store did not answer" in text and "every rank arrived late" not in text, text


def test_nccl_blocking_waits_are_not_sliced_but_still_read_the_notice(store_as_rank):
    from soap_dist.comm.guard import Guard, PeerFailed

    guard = Guard(0.2, rewaits=False)
    store_as_rank(1)
    guard.post_failure(3, "RuntimeError: boom")
    store_as_rank(0)
    once = _GlooLikeWork(10**6)
    with pytest.raises(PeerFailed, match="rank 1: RuntimeError: boom"):
        guard.wait(once, "x", [0, 1])
    assert len(once.waits) == 1 and once.waits[0] > 0.15  # the whole timeout in one wait


class _StaleFirstRead:
    """A store whose first compare_set returns the value it held before: the state this rank read
    just before another rank's give-up landed (one interleaving of two ranks, replayed in order)."""

    def __init__(self, store, stale: bytes | None = None, blind_to: str | None = None) -> None:
        self._store, self._stale, self._blind_to = store, stale, blind_to

    def compare_set(self, key, expected, desired):
        if self._stale is not None:
            stale, self._stale = self._stale, None
            return stale
        return self._store.compare_set(key, expected, desired)

    def check(self, keys):  # blind_to: a key this rank's polls happened not to see
        return not (self._blind_to and keys[0].endswith(self._blind_to)) and self._store.check(keys)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _two_guards(monkeypatch, timeout_s: float):
    import itertools

    from soap_dist.comm import guard as guard_module

    guards = []
    for _ in range(2):
        monkeypatch.setattr(guard_module, "_guards", itertools.count(70))
        guards.append(guard_module.Guard(timeout_s))
    return guards


def test_a_rank_waiting_alone_in_state_dict_says_so_before_it_gives_up(store_as_rank, monkeypatch):
    """state_dict() on one rank under DDP waits collective_timeout (600 s by default) for the others:
    one warning, after 30 s (or half the timeout), names the ranks missing and the fix."""
    from soap_dist.comm import guard as guard_module

    mine, _ = _two_guards(monkeypatch, 0.4)
    store_as_rank(0)
    with pytest.warns(
        RuntimeWarning, match=r"state_dict\(\) on rank 0 has waited 0 s for ranks \[1\]"
    ) as seen:
        with pytest.raises(guard_module.CollectiveTimeout, match=r"ranks \[1\] did not call it within 0.4 s"):
            guard_module.arrive_all(mine, "state_dict()", [0, 1])
    assert len(seen) == 1 and "hold_state_dict(keep=rank == 0)" in str(seen[0].message)


def test_a_rank_arriving_as_another_gives_up_does_not_pass_alone(store_as_rank, monkeypatch):
    """Rank 0 reads the rendezvous open, rank 1 gives up, then rank 0 sees rank 1's arrival: the
    rendezvous was settled as given up, so rank 0 raises too. Before, it passed alone and its
    state_dict collectives ran with no partner, while rank 1 raised."""
    from soap_dist.comm import guard as guard_module

    store = guard_module._store()
    mine, theirs = _two_guards(monkeypatch, 0.2)
    store_as_rank(1)
    with pytest.raises(guard_module.CollectiveTimeout, match=r"ranks \[0\] did not call it within 0.2 s"):
        guard_module.arrive_all(theirs, "state_dict()", [0, 1])
    store_as_rank(0)
    monkeypatch.setattr(guard_module, "_store", lambda: _StaleFirstRead(store, stale=b"0"))
    with pytest.raises(guard_module.CollectiveTimeout, match="another rank gave up waiting for it"):
        guard_module.arrive_all(mine, "state_dict()", [0, 1])
    assert mine.arrivals == theirs.arrivals == 0  # both retry at the same count: a later call on both meets
    monkeypatch.setattr(guard_module, "_store", lambda: store)
    retry = guard_module.rendezvous_prefix(theirs.id, [0, 1], 1) + "1/1"  # attempt 1 at count 1, rank 1
    store.set(retry, "state_dict()")  # rank 1's retry has arrived
    guard_module.arrive_all(mine, "state_dict()", [0, 1])
    assert mine.arrivals == 1


def test_a_rank_giving_up_as_the_last_one_arrives_passes_with_it(store_as_rank, monkeypatch):
    """Rank 1's polls miss rank 0, which arrives, sees rank 1 and settles the rendezvous as met:
    rank 1 passes too, though it never saw rank 0 (the settled state is what counts)."""
    from soap_dist.comm import guard as guard_module

    store = guard_module._store()
    mine, theirs = _two_guards(monkeypatch, 0.2)
    first = guard_module.rendezvous_prefix(mine.id, [0, 1], 1) + "0/1"  # attempt 0 at count 1, rank 1
    store.set(first, "state_dict()")  # rank 1 has arrived ...
    store_as_rank(0)
    guard_module.arrive_all(mine, "state_dict()", [0, 1])  # ... rank 0 comes and settles it met
    store_as_rank(1)
    monkeypatch.setattr(guard_module, "_store", lambda: _StaleFirstRead(store, stale=b"0", blind_to="/0"))
    guard_module.arrive_all(theirs, "state_dict()", [0, 1])  # never saw rank 0, yet passes
    assert mine.arrivals == theirs.arrivals == 1


def test_rendezvous_keys_do_not_pile_up_in_the_store(store_as_rank, monkeypatch):
    """Each state_dict() is a rendezvous with W + 1 store keys; a long run saves thousands of times.
    Meeting one deletes the previous one's keys (given-up attempts included): the store holds those of
    the last rendezvous only. Before, it grew by W + 1 keys per save (and more per give-up)."""
    from soap_dist.comm import guard as guard_module

    store = guard_module._store()
    mine, theirs = _two_guards(monkeypatch, 0.2)
    sizes = []
    for n in range(1, 7):
        if n == 3:  # rank 1 gives up alone first: attempt 0 is left behind, attempt 1 meets
            store_as_rank(1)
            with pytest.raises(guard_module.CollectiveTimeout):
                guard_module.arrive_all(theirs, "state_dict()", [0, 1])
        attempt = 1 if n == 3 else 0
        store_as_rank(1)
        store.set(guard_module.rendezvous_prefix(mine.id, [0, 1], n) + f"{attempt}/1", "state_dict()")
        store_as_rank(0)
        guard_module.arrive_all(mine, "state_dict()", [0, 1])  # meets: rank 1's key is there
        store_as_rank(1)  # rank 1 read the state key before rank 0 settled it (as it must have)
        stale = _StaleFirstRead(store, stale=str(attempt).encode())
        monkeypatch.setattr(guard_module, "_store", lambda stale=stale: stale)
        guard_module.arrive_all(theirs, "state_dict()", [0, 1])  # sees it met
        monkeypatch.setattr(guard_module, "_store", lambda: store)
        sizes.append(store.num_keys())
    assert mine.arrivals == theirs.arrivals == 6
    assert sizes[3:] == [sizes[2] - 1] * 3, sizes  # steady at 3 keys (n = 3 also held attempt 0's)
    assert sizes[-1] == 3, sizes  # the last rendezvous: its state key and the two ranks' keys


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


def test_a_timeouts_report_counts_collectives_per_group(store_as_rank):
    """Under hsdp ranks wait on different numbers of collectives (a replica's own reduces); the report
    of which ranks are absent from a group's collective must count that group's collectives only."""
    from soap_dist.comm.guard import CollectiveTimeout, Guard

    rank0, rank1 = Guard(0.3, rewaits=True), Guard(0.3, rewaits=True)
    rank1.id = rank0.id  # one guard on two ranks
    store_as_rank(1)
    with pytest.raises(CollectiveTimeout, match=r"ranks \[0\] did not arrive"):
        rank1.wait(_GlooLikeWork(10**6, early=True), "x", [0, 1])
    store_as_rank(0)
    rank0.wait(_GlooLikeWork(0), "y", [0, 2])  # two collectives rank 1 is not part of
    rank0.wait(_GlooLikeWork(0), "y", [0, 2])
    with pytest.raises(CollectiveTimeout, match="every rank arrived late or failed"):  # rank 1 came
        rank0.wait(_GlooLikeWork(10**6, early=True), "x", [0, 1])
