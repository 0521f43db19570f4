"""Starting the local processes of a distributed benchmark and collecting rank 0's result.

``run_ranks(worker, world, *args)`` spawns ``world`` processes running ``worker(rank, world, port,
*args, queue)`` on a free local port and returns what rank 0 puts on ``queue``. Imported by the
scripts beside it (``python benchmarks/<script>.py`` puts this folder on the path).
"""

from __future__ import annotations

import socket

import torch.multiprocessing as mp


def run_ranks(worker, world: int, *args, timeout_s: float = 1800.0):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=timeout_s)
    for p in procs:
        p.join()
    return result
