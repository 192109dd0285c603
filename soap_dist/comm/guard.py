"""No hang without a message: SOAP's collectives wait with a timeout, and a timeout names who is missing.

Every collective of an ``Exchange`` is waited through ``Guard.wait``. When one does not complete in
``timeout_s`` (a rank stopped calling ``step()``, called it with other options, or caught an
exception and went on), each rank that gave up writes its name into the process group's store and,
after a short grace period, reads which participants wrote nothing: those did not arrive. The error
names the collective, the optimizer step and those ranks.

That needs the host to wait, which is free on gloo (a CPU collective completes on the host anyway)
but not on a GPU: NCCL's ``Work.wait(timeout)`` blocks the host until the collective has run, and
so until every kernel queued before it has, which would turn each SOAP collective into a device
synchronisation and the side-stream refresh into a blocking one. So on CUDA the wait is the
stream-ordered ``Work.wait()`` (the current stream waits on the GPU; the host goes on), and a
collective that never completes is ended by NCCL's watchdog after the process group's timeout
(``init_process_group(timeout=...)``), with NCCL's message. ``TORCH_NCCL_BLOCKING_WAIT=1`` makes
NCCL block the host anyway; then SOAP's timeout and its message naming the absent ranks apply too.

A rank whose ``step()`` raised after that step's collectives began will not join the next one, and
its peers should not wait the whole timeout to learn that: it posts a failure notice to the store
(``Guard.post_failure``, under a key of the exchange's ranks; the first notice stays, so it names the
root cause), and a rank waiting on gloo waits in slices of ``NOTICE_POLL_S``, reading the notice
between them, so it stops within about a second with the failing rank's own error (``PeerFailed``),
whichever of the exchange's collectives it waits in: the run must restart anyway, and only the first
notice is kept, so a rank that waits on a stopped one rather than on the failed one still learns it.
gloo lets a timed-out wait be waited again; NCCL under blocking waits does not, so there the notice
is read only once the wait failed. The collectives the ranks abandoned stay queued in the process
group, so the way on is a restart from a checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
import warnings
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..idle import callers_level

DEFAULT_TIMEOUT_S = 600.0  # SOAP's own collectives; the process group's default is 30 minutes
GRACE_S = 30.0  # how long a rank that timed out waits for the others to report theirs
NOTICE_POLL_S = 1.0  # gloo: how often a waiting rank looks for a peer's failure notice
WAITING_NOTE_S = 30.0  # a rendezvous (arrive_all) says whom it waits for after this (or half its timeout)


class CollectiveTimeout(RuntimeError):
    """A SOAP collective did not complete in time; the message names what and who."""


class PeerFailed(CollectiveTimeout):
    """A SOAP collective cannot complete: another rank's step() raised after its collectives began
    (the message carries that rank's error). A CollectiveTimeout, so one ``except`` catches both."""


_guards = itertools.count()  # optimizers are built in the same order on every rank: same ids


def _store() -> Any:
    """The default process group's store, or None (no group, or a torch without it)."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # pragma: no cover - a torch without it
        return None


BLOCKING_WAIT_VARIABLES = ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT")  # the first one set decides
TRUE_WORDS = ("1", "y", "yes", "t", "true")  # what torch's own reading of these accepts, in any case


def nccl_blocks_host() -> bool:
    """Whether NCCL's waits block the host, read from the environment as torch reads it."""
    for name in BLOCKING_WAIT_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            return value.lower() in TRUE_WORDS
    return False


def host_waits_for(device: torch.device, backend: str | None = None) -> bool:
    """Whether SOAP's collectives on ``device`` wait on the host with SOAP's timeout: off a GPU, under
    a backend other than NCCL for it (``backend``, e.g. gloo, whose waits are on the host anyway), or
    when the user asked NCCL for blocking waits (then the host blocks whatever SOAP passes)."""
    if device.type != "cuda" or (backend is not None and backend != "nccl"):
        return True
    return nccl_blocks_host()


def unheeded_timeout(device: torch.device, timeout_s: float, backend: str | None = None) -> str | None:
    """What to tell a user who chose a collective_timeout that SOAP cannot apply here (None: it does)."""
    if host_waits_for(device, backend) or timeout_s == DEFAULT_TIMEOUT_S:
        return None
    return (
        f"SOAP: collective_timeout={timeout_s:g} s does not apply on CUDA: SOAP's collectives are waited "
        "stream-ordered there, so they never block the host, and NCCL's watchdog ends a stuck one after "
        "the process group's timeout (init_process_group(timeout=...)). Set TORCH_NCCL_BLOCKING_WAIT=1 for "
        "SOAP's timeout and its message naming the absent ranks, at one host synchronisation per collective."
    )


class Guard:
    """Waits on one exchange's collectives; counts them so every rank names the same one."""

    def __init__(
        self,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        host_waits: bool = True,
        rewaits: bool = False,
        ranks: Sequence[int] = (),
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.host_waits = host_waits  # False: stream-ordered waits (CUDA), see host_waits_for
        self.rewaits = rewaits  # the backend lets a timed-out wait be waited again (gloo): wait in slices
        self.id = next(_guards)
        self.seq = 0  # collectives waited on: differs between ranks where they wait on different ones (hsdp)
        self.arrivals = 0  # rendezvous met (arrive_all): the same on every rank
        # collectives per group of participants: the same on every member (each group's collectives
        # run in one order on all its members), unlike seq under hsdp; keys a timeout's report
        self.group_seq: dict[tuple[int, ...], int] = {}
        self.step = 0  # the optimizer step being run, set by the optimizer at each call
        self.last_met: tuple[str, int] | None = None  # the last rendezvous met: its keys' prefix, attempt
        # Failure notices are shared by every optimizer over the same ranks: a rank whose step in one
        # SOAP raised stops the others' waits in another (SOAP for the matrices beside a second one) at
        # once, as their collectives share the process group and cannot pair any more. Keyed by the
        # ranks, not by the guard: optimizers over other groups (data-parallel groups beside tensor
        # parallelism, pipeline stages) are apart.
        self._notice_key = f"soap_dist/ranks{_digest(ranks)}/failed"

    # ----- failure notices: a rank that raised tells the ranks waiting for it -----
    def post_failure(self, step: int, error: str) -> None:
        """Tell the other ranks that this one's step ``step`` raised ``error`` and it will not join
        their collectives; the first notice stays (it names the root cause, not the ranks it stopped)."""
        store = _store()
        if store is None:
            return
        try:
            store.compare_set(self._notice_key, "", f"{dist.get_rank()}\n{step}\n{error}")
        except Exception:  # pragma: no cover - the store itself is gone: the timeout still applies
            pass

    def peer_failure(self) -> tuple[int, int, str] | None:
        """(rank, step, error) of a failure notice another rank of the exchange posted, or None."""
        store = _store()
        if store is None:
            return None
        try:
            if not store.check([self._notice_key]):
                return None
            rank, step, error = store.get(self._notice_key).decode().split("\n", 2)
        except Exception:  # pragma: no cover - the store itself is gone
            return None
        return None if int(rank) == dist.get_rank() else (int(rank), int(step), error)

    def wait(self, work: Any, name: str, participants: Sequence[int]) -> None:
        """Wait for ``work``; raise PeerFailed when a peer's step raised (it posted a notice), or
        CollectiveTimeout naming the absent ranks when the wait timed out or broke. Without host waits,
        only the current stream waits (NCCL's watchdog owns the timeout)."""
        self.seq += 1
        group = tuple(participants)
        self.group_seq[group] = self.group_seq.get(group, 0) + 1
        if not self.host_waits:
            work.wait()
            return
        deadline = time.monotonic() + self.timeout_s
        while True:
            span = max(deadline - time.monotonic(), 0.001)  # never 0: torch reads a zero timeout as none
            if self.rewaits:
                span = min(NOTICE_POLL_S, span)
            began = time.monotonic()
            try:
                work.wait(timeout=timedelta(seconds=span))
                return
            except RuntimeError as error:
                failed = error
            self._raise_if_a_peer_failed(name)
            # The whole slice passed and time is left: wait again. A wait that broke early (a peer's
            # connection closed) or the last slice goes on to name the absent ranks.
            waited_out = time.monotonic() - began >= 0.9 * span
            if not (self.rewaits and waited_out and time.monotonic() < deadline):
                break
        cause = str(failed).splitlines()[0] if str(failed) else ""
        waited = time.monotonic() - (deadline - self.timeout_s)
        missing = self.missing(name, participants)
        self._raise_if_a_peer_failed(name)  # a notice may have come during the grace period
        if missing:
            who = f"ranks {missing} did not arrive"
        elif missing is None:  # the store is gone with the process that hosted it (the first node's)
            who = "which ranks is unknown: the rendezvous store did not answer (its host may have stopped)"
        else:
            who = "every rank arrived late or failed"
        when = (
            f"did not complete in {self.timeout_s:g} s"
            if waited >= 0.9 * self.timeout_s
            else f"broke off after {waited:.1f} s"
        )
        raise CollectiveTimeout(
            f"SOAP: the {name} of optimizer step {self.step} (SOAP collective #{self.seq}) {when}: "
            f"{who}. Every rank must call step() (and state_dict()) "
            "the same number of times, with the same parameters and options; a rank whose step() "
            f"raised must not go on. ({type(failed).__name__}: {cause})"
        ) from None

    def _raise_if_a_peer_failed(self, name: str) -> None:
        failure = self.peer_failure()
        if failure is None:
            return
        rank, step, error = failure
        raise PeerFailed(
            f"SOAP: the {name} of optimizer step {self.step} cannot complete: rank {rank}'s step() raised "
            f"in its optimizer step {step}, after that step's collectives had begun, and it will not join "
            f"(rank {rank}: {error}). The ranks' optimizer states may differ and their collectives no longer "
            "pair: end the run on every rank and restart it from the last checkpoint."
        ) from None

    def missing(self, name: str, participants: Sequence[int]) -> list[int] | None:
        """The participants (global ranks) that did not report this collective within the grace period."""
        store = _store()
        if store is None:
            return None
        try:
            return _report(
                store,
                f"soap_dist/guard{self.id}/ranks{_digest(participants)}/c{self.group_seq[tuple(participants)]}/",
                name,
                participants,
                min(GRACE_S, self.timeout_s),
                pause=0.2,
            )
        except Exception:  # pragma: no cover - the store itself is gone
            return None


def _report(
    store: Any, prefix: str, name: str, participants: Sequence[int], within_s: float, pause: float
) -> list[int]:
    """Write this rank's key under ``prefix``, then wait up to ``within_s`` for every other
    participant's; return the participants whose key never came (empty when all did)."""
    me = dist.get_rank()
    store.set(prefix + str(me), name)
    others = [r for r in participants if r != me]
    deadline = time.monotonic() + within_s
    while not store.check([prefix + str(r) for r in others]):  # one request per poll
        if time.monotonic() > deadline:
            return _absent(store, prefix, others)
        time.sleep(pause)
    return []


def _absent(store: Any, prefix: str, ranks: Sequence[int]) -> list[int]:
    """The ranks whose key under ``prefix`` is not in the store (one request each: for messages only)."""
    return [r for r in ranks if not store.check([prefix + str(r)])]


def arrive_all(guard: Guard, name: str, participants: Sequence[int]) -> None:
    """A rendezvous through the store, not a collective: every participant must reach ``name`` within
    the timeout, else CollectiveTimeout on every rank that came. For calls users make on one rank by
    mistake (``state_dict()`` under DDP), so that they fail before any collective collides.

    Whether a rendezvous met or was given up is settled once, by one ``compare_set`` on its state key,
    so a rank arriving just as another gives up cannot pass alone. A given-up rendezvous opens the
    next attempt under the same count: the ranks that never came, and a retry on every rank, meet
    there (else every later ``state_dict()`` would time out)."""
    store = _store()
    if store is None or len(participants) < 2:
        return
    guard.arrivals += 1
    here = rendezvous_prefix(guard.id, participants, guard.arrivals)
    attempt = _decode(store.compare_set(here + "state", "", "0"))  # the open attempt (opens the first)
    met = f"{attempt}:met"
    prefix = f"{here}{attempt}/"
    me = dist.get_rank()
    store.set(prefix + str(me), name)
    start = time.monotonic()
    deadline = start + guard.timeout_s
    ranks = [r for r in participants if r != me]
    others = [prefix + str(r) for r in ranks]
    elsewhere = False  # another rank gave this attempt up, just before or as this one arrived
    pause = 0.001  # doubling to 50 ms: a save that meets at once costs a few ms, a long wait few polls
    note_at = start + min(WAITING_NOTE_S, guard.timeout_s / 2)  # one note, well before the end
    while True:
        everyone = store.check(others)  # one request per poll, whatever the world size
        state = _decode(
            store.compare_set(here + "state", attempt, met) if everyone else store.get(here + "state")
        )
        if state == met:
            _forget_last(store, guard, participants, (here, int(attempt)))
            return
        if state != attempt:
            elsewhere = True
            break
        if time.monotonic() > deadline:
            state = _decode(store.compare_set(here + "state", attempt, str(int(attempt) + 1)))
            if state == met:  # the last rank came as this one gave up, and settled first
                _forget_last(store, guard, participants, (here, int(attempt)))
                return
            break
        if note_at is not None and time.monotonic() > note_at:
            note_at = None
            _note_waiting(name, _absent(store, prefix, ranks), time.monotonic() - start, guard.timeout_s)
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
    absent = [] if elsewhere else _absent(store, prefix, ranks)
    guard.arrivals -= 1  # nothing happened: the next call on every rank is this one's retry
    if elsewhere:
        who = f"another rank gave up waiting for it after {guard.timeout_s:g} s, as this one waited"
    elif absent:
        who = f"ranks {absent} did not call it within {guard.timeout_s:g} s"
    else:
        who = f"the other ranks called it only as this one gave up waiting ({guard.timeout_s:g} s)"
    raise CollectiveTimeout(
        f"SOAP: {name} is a collective here, and {who}. Call it on every rank (save on one: "
        "sd = opt.state_dict(); if rank == 0: torch.save(sd, path)), or where a framework calls it on "
        "the saving rank only, opt.hold_state_dict(keep=rank == 0) on every rank first (the HF Trainer: "
        "callbacks=[soap_dist.integrations.hf_trainer.save_callback()]); docs/design.md, "
        "'Failure behaviour'."
    )


def _note_waiting(name: str, absent: Sequence[int], waited_s: float, timeout_s: float) -> None:
    """The one line a rank waiting in a rendezvous prints before it gives up: most such waits are a
    call made on one rank only, and its timeout (collective_timeout, 600 s by default) is long."""
    if not absent:
        return
    warnings.warn(
        f"SOAP: {name} on rank {dist.get_rank()} has waited {waited_s:.0f} s for ranks {absent}: it is a "
        f"collective here, so every rank must call it. Still waiting (it gives up after {timeout_s:g} s); "
        "where only the saving rank calls it, call opt.hold_state_dict(keep=rank == 0) on every rank first.",
        RuntimeWarning,
        stacklevel=callers_level(),  # the user's state_dict() or hold_state_dict() call
    )


def _forget_last(store: Any, guard: Guard, participants: Sequence[int], now: tuple[str, int]) -> None:
    """Delete the keys of the guard's previous rendezvous, so a run's store holds one per guard, not
    one per ``state_dict()``. Safe once this one has met: every participant wrote its key here, so
    none still reads the previous one. Each rank deletes its own keys, the lowest the state key."""
    last, guard.last_met = guard.last_met, now
    if last is None:
        return
    here, attempts = last
    me = dist.get_rank()
    keys = [f"{here}{a}/{me}" for a in range(attempts + 1)]  # given-up attempts left keys too
    if me == min(participants):
        keys.append(here + "state")
    try:
        for key in keys:
            store.delete_key(key)
    except Exception:  # pragma: no cover - a store without delete_key: the keys stay, nothing else
        pass


def rendezvous_prefix(guard_id: int, participants: Sequence[int], seq: int) -> str:
    """The store keys of a guard's rendezvous number ``seq``. Exchanges over other groups (HSDP's shard
    groups under owner_scope="shard_group") have guards with the same ids: the keys name the ranks."""
    return f"soap_dist/guard{guard_id}/ranks{_digest(participants)}/arrive{seq}/"


def _digest(ranks: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:12]


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
