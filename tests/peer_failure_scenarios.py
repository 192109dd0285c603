"""Faults that a peer's failure notice must end (comm.guard), on 2 gloo ranks, each in a spawn of its
own (they leave a collective unmatched): run through ``reliability_scenarios.run`` by name."""

from __future__ import annotations

import time

from reliability_scenarios import KW, NOTICE_WAIT_S, NOTICED_TIMEOUT_S, _grads, _params, _same_everywhere

from soap_dist import SOAP


def _stepping_and_catching(opt, params, steps: int, before) -> dict:
    """Step as a user who catches step()'s exceptions and goes on (``before(step)`` injects the fault):
    the errors, and the longest step in seconds."""
    errors, longest = [], 0.0
    for step in range(steps):
        before(step)
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = g
        longest = max(longest, _timed_step(opt, errors))
    return {"errors": errors, "longest_step_s": longest}


def _timed_step(opt, errors: list[str]) -> float:
    """One step() in seconds; its exception, if any, appended to ``errors`` as a user who catches it."""
    began = time.monotonic()
    try:
        opt.step()
    except Exception as error:
        errors.append(f"{type(error).__name__}: {error}")
    return time.monotonic() - began


def refresh_raised_and_was_caught(rank):
    import soap_dist.linalg as linalg

    params = _params()
    opt = SOAP(params, collective_timeout=NOTICED_TIMEOUT_S, **KW)
    real = linalg.power_iteration_refresh

    def boom(*args, **kwargs):
        raise RuntimeError("injected: out of memory in the refresh")

    def before(step):
        linalg.power_iteration_refresh = boom if step == 3 and rank == 0 else real

    try:
        return _stepping_and_catching(opt, params, 6, before)
    finally:
        linalg.power_iteration_refresh = real


def async_finish_raised_and_was_caught(rank):
    """async_refresh: the finish of a launched refresh raises on rank 0 at the next step."""
    params = _params()
    opt = SOAP(params, collective_timeout=NOTICED_TIMEOUT_S, refresh_delay=1, async_refresh=True, **KW)

    def boom(*args, **kwargs):
        raise RuntimeError("injected: out of memory in the finish")

    def before(step):
        if step == 4 and rank == 0:  # the refresh launched by the 4th call is finished by the 5th
            opt._engine._finish_chunk = boom

    return _stepping_and_catching(opt, params, 7, before)


def a_failure_in_one_optimizer_stops_waits_in_another(rank):
    """Two SOAPs over the same ranks (e.g. matrices and embeddings apart): rank 0's step of the first
    raises after its collectives began, and rank 1, already waiting in the second's, stops within about
    a second with that error (it waited collective_timeout, naming no cause: notices were per optimizer)."""
    first, second = _params(), _params(seed=1)
    a = SOAP(first, collective_timeout=NOTICED_TIMEOUT_S, **KW)
    b = SOAP(second, collective_timeout=NOTICED_TIMEOUT_S, **KW)
    errors, longest = [], 0.0
    for step in range(4):
        for p, g in zip(first + second, _grads(step) + _grads(step + 50), strict=True):
            p.grad = g
        if step == 2 and rank == 0:  # a step with no refresh (the 3rd; SOAP refreshes at the 4th)

            def boom(*args, **kwargs):
                raise RuntimeError("injected: out of memory in the first optimizer")

            a._engine.apply = boom  # after the step's agreement all_reduce
        for opt in (a, b):
            longest = max(longest, _timed_step(opt, errors))
            if errors:
                if rank == 0:
                    time.sleep(3 * NOTICE_WAIT_S)  # alive, in no collective: rank 1 must not wait for it
                return {"errors": errors, "longest_step_s": longest}
    return {"errors": errors, "longest_step_s": longest}


def a_peer_slower_than_a_wait_slice(rank):
    """gloo waits in slices (comm.guard.NOTICE_POLL_S) and waits again: a healthy peer 2.5 s late
    must not end the step."""
    params = _params()
    opt = SOAP(params, collective_timeout=NOTICED_TIMEOUT_S, **KW)
    for step in range(5):
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = g
        if step == 3 and rank == 1:
            time.sleep(2.5)
        opt.step()
    return {"same": _same_everywhere(params)}
