"""A rank that dies, or stops answering, makes the others stop with ExpertParallelCommError, which
names the collective, the layer and the timeout key, within the strategy's timeout (2 s here)."""

from __future__ import annotations

import os
import time

import pytest
import torch
from dsv3_lightning.plugins.expert_parallel import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm
from dsv3_lightning.plugins.expert_parallel.sharding import shard_experts
from ep_launch import run_ranks
from ep_tiny import make_module

from dsv3_lightning.plugins.parallel.mesh import ParallelMesh

TIMEOUT_S = 2.0


def forward_while_rank1_fails(rank: int, world: int, how: str):
    mesh = ParallelMesh.create(1, world, TIMEOUT_S)  # the strategy's groups, with its timeout
    moe = make_module(mtp=False).model.model.layers[1].mlp
    comm = Comm(mesh.expert_group, TIMEOUT_S, "layer model.model.layers.1.mlp")
    shard_experts(moe, mesh.expert_rank, world, lambda name, e: AllToAllTokenDispatcher(comm, e, world))
    if rank == 1:
        if how == "dies":
            os._exit(1)
        time.sleep(4 * TIMEOUT_S)  # alive but silent
        return None
    start = time.monotonic()
    try:
        moe(torch.randn(2, 4, 32))
    except RuntimeError as err:
        return type(err).__name__, str(err), time.monotonic() - start
    return "no error", "", time.monotonic() - start


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_other_rank_fails_with_a_clear_error_within_the_timeout(how):
    results = run_ranks(2, forward_while_rank1_fails, how, timeout_s=TIMEOUT_S, join_s=15, wait_for={0})
    status, value = results[0]
    assert status == "ok", value
    name, message, seconds = value
    assert name == "ExpertParallelCommError", (name, message)
    assert "count exchange of layer model.model.layers.1.mlp failed" in message
    assert "trainer.strategy.init_args.timeout" in message and "2 s" in message
    assert seconds < TIMEOUT_S + 3
