"""Run a test's worker on several CPU processes (torch.distributed over gloo), one launcher for every
multi-process test: each rank calls ``worker(rank, world, port, queue, *args)`` and puts
``(rank, result)`` on the queue once (plain Python values: no shared-memory tensor handles)."""
from __future__ import annotations

import socket
from typing import Any, Callable, Dict


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """The process group of one rank on this machine (one thread per rank: 2 cores, 2 ranks)."""
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def run_ranks(worker: Callable, world: int = 2, *args: Any, timeout: float = 300) -> Dict[int, Any]:
    """``{rank: result}`` of ``world`` spawned processes running ``worker`` (a module-level function). A rank
    that dies (an exception, a crash) fails the test at once instead of leaving the others waiting in a
    collective until ``timeout``."""
    import queue
    import time

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, q, *args)) for r in range(world)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, result = q.get(timeout=1.0)
                results[rank] = result
                continue
            except queue.Empty:
                pass
            dead = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results}
            if dead:
                raise AssertionError(f"rank(s) died before reporting (exit codes {dead}); their error is above")
            if time.monotonic() > deadline:
                raise AssertionError(f"ranks did not report within {timeout} s")
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return results
