"""comm.guard on its own, in one process: how SOAP's collectives wait (on the host or stream-ordered),
the failure notices that end a wait early, the store rendezvous of calls users might make on one rank
(state_dict()), and what a timeout reports. Split from test_reliability.py, whose faults run on 2
gloo ranks (docs/design.md, "Failure behaviour")."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")


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
    assert seen[0].filename == __file__  # the caller's line, not soap_dist's


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
