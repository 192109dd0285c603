"""GPU-only checks (skipped without CUDA): no host sync in an ordinary step or in the launch of the
asynchronous refresh; GPU agrees with CPU; SOAP's collective waits on NCCL leave the host free; the
refresh with no host reads replays from a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from soap_dist import SOAP

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = [(48, 48), (48,), (64, 64), (32, 32)]  # square: full-rank factors from the first call


def _params(device):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]


def _grads(steps):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]


def _step(opt, params, step_grads):
    for p, g in zip(params, step_grads, strict=True):
        p.grad = g.cuda()
    opt.step()


def _step_without_host_sync(opt, params, step_grads):
    """One step under set_sync_debug_mode("error"): any host synchronisation inside it raises."""
    for p, g in zip(params, step_grads, strict=True):
        p.grad = g.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_ordinary_step_has_no_host_sync():
    params = _params("cuda")
    opt = SOAP(params, precondition_frequency=10)
    grads = _grads(4)
    for step_grads in grads[:3]:  # first call, then two steps (compilation happens here)
        _step(opt, params, step_grads)
    _step_without_host_sync(opt, params, grads[3])


def test_a_step_that_launches_the_async_refresh_has_no_host_sync():
    """engine.async_refresh: the launch reads nothing on the host (the CholeskyQR2 runs without its
    host-side fallback; new index tensors come from pinned memory), so the step that launches a
    refresh on the side stream never waits for the GPU."""
    params = _params("cuda")
    opt = SOAP(params, precondition_frequency=3, refresh_delay=1)  # async_refresh: on by default here
    grads = _grads(7)
    for step_grads in grads[:6]:  # the first bases, a launch at the 4th call, its finish at the 5th
        _step(opt, params, step_grads)
    assert opt._engine.side is not None and not opt._engine._launched
    _step_without_host_sync(opt, params, grads[6])  # the 7th call launches the second refresh
    assert opt._engine._launched
    timed = opt.stats()["refresh_side_stream_seconds"]  # the first refresh's span, finished at call 5
    _step(opt, params, grads[0])  # the 8th call finishes the second
    assert 0 < timed < opt.stats()["refresh_side_stream_seconds"]


def test_cuda_matches_cpu_in_full_fp32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        results = []
        for device in ("cpu", "cuda"):
            params = _params(device)
            opt = SOAP(params, precondition_frequency=3)
            for step_grads in _grads(20):
                for p, g in zip(params, step_grads, strict=True):
                    p.grad = g.to(device)
                opt.step()
            results.append([p.detach().cpu() for p in params])
        for a, b in zip(*results, strict=True):
            assert ((a - b).norm() / a.norm()).item() < 1e-4
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_a_soap_collective_on_nccl_does_not_block_the_host(tmp_path):
    """comm.guard: on CUDA a SOAP collective's wait is stream-ordered; the host must not wait for
    the kernels queued before it (a 1-rank NCCL group; the GPU is kept busy with a spin kernel)."""
    import time

    import torch.distributed as dist

    from soap_dist.comm.guard import Guard, host_waits_for

    if not dist.is_nccl_available():
        pytest.skip("needs NCCL")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        assert not host_waits_for(torch.device("cuda", 0))
        buffer = torch.ones(4, device="cuda")
        dist.all_reduce(buffer)  # NCCL's communicator is built here, not in the timed part
        torch.cuda.synchronize()
        busy = 200_000_000  # spin cycles: about 0.1 s at H100 clocks
        start = time.perf_counter()
        torch.cuda._sleep(busy)
        work = dist.all_reduce(buffer, async_op=True)
        Guard(60.0, host_waits=host_waits_for(buffer.device)).wait(work, "test all_reduce", [0])
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        assert host < 0.5 * total, (host, total)
        assert buffer.tolist() == [1.0] * 4
    finally:
        dist.destroy_process_group()


def test_the_refresh_with_no_host_reads_replays_from_a_cuda_graph():
    """refresh_parts times this replay against the eager refresh (the launch cost); it must be the
    same refresh: on other inputs copied into the captured ones, the eager refresh's results."""
    from soap_dist import linalg
    from soap_dist.bench.refresh_parts import _captured, _problem

    factors, basis = _problem(4, 256, torch.device("cuda"))
    out = {}

    def refresh():
        out["result"] = linalg.power_iteration_refresh(factors, basis, "cholesky_qr2", fallback=False)

    replay = _captured(refresh)
    replay()  # a capture records the kernels without running them: its outputs hold nothing yet
    torch.cuda.synchronize()
    first = [t.clone() for t in out["result"]]
    new_factors, new_basis = factors.roll(1, 0), basis.roll(1, 0).flip(-1)  # another order of eigenvalues
    factors.copy_(new_factors)
    basis.copy_(new_basis)
    replay()
    torch.cuda.synchronize()
    graphed = [t.clone() for t in out["result"]]
    eager = linalg.power_iteration_refresh(new_factors, new_basis, "cholesky_qr2", fallback=False)
    assert not torch.equal(graphed[1], first[1]), "the replay did not read the new inputs"
    assert bool(eager[2].all()) and torch.equal(graphed[2], eager[2]), (graphed[2], eager[2])
    differ = int((graphed[1] != eager[1]).sum())
    assert differ == 0, f"{differ} permutation entries differ from the eager refresh's"
    gap = (graphed[0] - eager[0]).abs().max()
    assert torch.allclose(graphed[0], eager[0], atol=1e-5), f"bases differ by {gap:.2e}"


def test_a_load_waits_for_the_side_stream_refresh_of_the_engine_it_replaces(monkeypatch):
    """load_state_dict drops the engine, and its memory goes back to the step's stream: that stream
    must first wait for a refresh still running on the side stream (here held there about 1 s)."""
    from soap_dist import linalg

    real = linalg.power_iteration_refresh

    def held(*args, **kwargs):
        torch.cuda._sleep(2_000_000_000)  # spin cycles on the current stream: the side stream
        return real(*args, **kwargs)

    params = _params("cuda")
    opt = SOAP(params, precondition_frequency=3, refresh_delay=1, async_refresh=True)
    grads = _grads(7)
    for step_grads in grads[:4]:
        _step(opt, params, step_grads)
    saved = opt.state_dict()
    monkeypatch.setattr(linalg, "power_iteration_refresh", held)
    for step_grads in grads[4:7]:  # the 7th call launches a refresh
        _step(opt, params, step_grads)
    replaced = opt._engine
    assert replaced._launched and replaced.side.busy
    opt.load_state_dict(saved)
    torch.cuda.current_stream().synchronize()
    assert replaced.side.stream.query(), "the load left the replaced engine's refresh running"
