"""Runs a function in N forked gloo processes and returns each rank's result (or raises its error)."""

from __future__ import annotations

import io
import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, timeout_s, fn, args, queue):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        buffer = io.BytesIO()  # tensors as bytes: shared-memory handles die with this process
        torch.save(fn(rank, world, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException as err:  # noqa: BLE001 - handed to the test process
        queue.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    world: int, fn, *args, timeout_s: float = 30.0, join_s: float = 60.0, wait_for: set[int] | None = None
) -> dict[int, tuple[str, object]]:
    """{rank: ("ok", result) | ("error", message)} once the ranks of ``wait_for`` (default: all) have
    answered, all processes have ended, or ``join_s`` passed; ranks still running are then killed, and
    ranks that died without a word are left out."""
    import queue as queue_module
    import time

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, timeout_s, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    wanted = set(range(world)) if wait_for is None else wait_for
    deadline = time.monotonic() + join_s
    while not wanted <= results.keys() and time.monotonic() < deadline:
        try:
            rank, status, value = queue.get(timeout=0.1)
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            continue
        results[rank] = (status, torch.load(io.BytesIO(value), weights_only=False) if status == "ok" else value)
    for p in procs:
        p.join(1)
    for p in procs:
        if p.is_alive():
            p.kill()
    return results
