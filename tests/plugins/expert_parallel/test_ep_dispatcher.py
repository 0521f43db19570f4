"""The all-to-all dispatcher: an MoE layer whose experts are split over 2 ranks gives each rank the
same outputs and the same gradients as the whole layer on one process (uneven splits, autograd)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.sharding import shard_experts
from ep_launch import run_ranks
from ep_tiny import make_module


def make_moe():
    return make_module(mtp=False).model.model.layers[1].mlp


def inputs(rank: int) -> torch.Tensor:
    return torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(rank))


def reference(rank: int):
    """Output and gradients of rank ``rank``'s tokens through the whole layer (local dispatcher)."""
    moe = make_moe()
    x = inputs(rank).requires_grad_()
    out = moe(x)
    out.square().sum().backward()
    return out.detach(), x.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad


def sharded(rank: int, world: int, fp8: bool = False):
    moe = make_moe()
    comm = Comm(dist.group.WORLD, 30.0, "test layer")
    [shard] = shard_experts(moe, rank, world, lambda name, e: AllToAllTokenDispatcher(comm, e, world, fp8=fp8))
    x = inputs(rank).requires_grad_()
    out = moe(x)
    out.square().sum().backward()
    counts = moe.gate.last_stats.tokens_per_expert_E
    if fp8:
        return out.detach(), x.grad, moe.dispatcher.last_dispatch_bytes, counts.sum()
    return out.detach(), x.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad, shard.offset, counts


def test_two_ranks_match_the_whole_layer():
    results = run_ranks(2, sharded)
    assert all(status == "ok" for status, _ in results.values()), results
    refs = [reference(r) for r in range(2)]
    gate_up_sum = refs[0][2] + refs[1][2]  # each shard's gradient sums both ranks' tokens
    down_sum = refs[0][3] + refs[1][3]
    splits = []
    for rank, (_, (out, x_grad, gate_up_grad, down_grad, offset, counts)) in sorted(results.items()):
        torch.testing.assert_close(out, refs[rank][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_grad, refs[rank][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gate_up_grad, gate_up_sum[offset : offset + 4], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(down_grad, down_sum[offset : offset + 4], rtol=1e-5, atol=1e-6)
        splits.append(counts.view(2, 4).sum(1).tolist())
    assert any(a != b for a, b in splits), f"the test should exercise uneven splits: {splits}"


def test_fp8_dispatch_sends_a_quarter_of_the_bytes_and_stays_close():
    """E4M3 with 1x128 scales: each dispatched value within 2^-4 relative, so the layer's output stays
    within a few percent; dispatch bytes D + 4 per copy instead of 4·D (combine stays float32)."""
    results = run_ranks(2, sharded, True)
    assert all(status == "ok" for status, _ in results.values()), results
    for rank, (_, (out, x_grad, bytes_sent, copies)) in sorted(results.items()):
        want_out, want_x_grad = reference(rank)[:2]
        error = float((out - want_out).norm() / want_out.norm())
        assert 0 < error < 0.05, error
        assert float((x_grad - want_x_grad).norm() / want_x_grad.norm()) < 0.05
        assert bytes_sent == int(copies) * (32 + 4)  # T·K copies of 32 E4M3 values and one float32 scale
