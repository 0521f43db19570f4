"""The (F;B) overlap: a forward and a backward chunk taking turns at their all-to-alls.

The turn protocol is checked on fake collectives; then 2 gloo processes with expert parallelism run
the same 1F1B-paired micro-batches sequentially and overlapped: bitwise the same losses and
gradients, with the all-to-alls of both chunks issued inside pairs.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.nn.functional as F
from dsv3_lightning.plugins.dualpipe.interleaver import ChunkInterleaver, one_f_one_b
from dsv3_lightning.plugins.dualpipe.overlap import InterleavedOverlap
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.sharding import shard_experts
from dualpipe_tiny import fork_ranks, make_module, make_tokens


class _Done:
    def wait(self) -> None:
        pass


def test_chunks_take_turns_at_each_collective():
    interleaver = ChunkInterleaver()
    trace = []

    def chunk(name: str, collectives: int):
        def run():
            for i in range(collectives):
                trace.append(f"{name}{i}")
                interleaver.wait(_Done(), "test")
            trace.append(f"{name}-end")

        return run

    interleaver.run_pair(chunk("F", 2), chunk("B", 3))
    # F computes until its first collective, B until its first, and so on; B finishes alone
    assert trace == ["F0", "B0", "F1", "B1", "F-end", "B2", "B-end"]
    assert interleaver.stats.collectives == 5
    assert interleaver.stats.in_pairs == 4  # B's last collective had no partner left
    interleaver.wait(_Done())  # outside a pair: just waits
    assert interleaver.stats.in_pairs == 4


def test_a_chunk_is_recognised_by_its_turn_not_its_thread():
    # on CUDA the autograd engine runs a backward on its device thread, not on the worker that called
    # backward(): collectives from such a thread still take turns
    interleaver = ChunkInterleaver()
    trace = []

    def forward():
        for i in range(2):
            trace.append(f"F{i}")
            interleaver.wait(_Done())
        trace.append("F-end")

    def backward_on_another_thread():
        def engine():
            for i in range(2):
                trace.append(f"B{i}")
                interleaver.wait(_Done())
            trace.append("B-end")

        thread = threading.Thread(target=engine)
        thread.start()
        thread.join()

    interleaver.run_pair(forward, backward_on_another_thread)
    assert trace == ["F0", "B0", "F1", "B1", "F-end", "B-end"]
    assert interleaver.stats.in_pairs == 4


def test_an_unknown_timing_is_refused():
    with pytest.raises(ValueError, match=r"timing \('wall'\) must be 'auto', 'host' or 'cuda'"):
        ChunkInterleaver(timing="wall")


@pytest.mark.parametrize(("failing", "ran"), [("forward", [0]), ("backward", [0, 1])])
def test_an_error_stops_the_other_chunk_at_its_next_collective(failing, ran):
    interleaver = ChunkInterleaver()
    progress = []

    def ok():
        for i in range(3):
            progress.append(i)
            interleaver.wait(_Done())

    def fail():
        interleaver.wait(_Done())
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):  # the error itself, not the other chunk's ChunkAborted
        interleaver.run_pair(*((fail, ok) if failing == "forward" else (ok, fail)))
    assert progress == ran  # stopped at its next collective rather than waiting for peers that will not come


def test_a_forward_that_fails_at_once_skips_the_backward():
    interleaver = ChunkInterleaver()
    ran = []
    with pytest.raises(ValueError, match="boom"):
        interleaver.run_pair(lambda: (_ for _ in ()).throw(ValueError("boom")), lambda: ran.append("B"))
    assert ran == []
    interleaver.run_pair(lambda: ran.append("F"), lambda: ran.append("B"))  # the next pair runs normally
    assert ran == ["F", "B"]


def _loss(module, tokens):
    inputs, targets = module._split(tokens)
    return F.cross_entropy(module.model(inputs).logits.flatten(0, 1), targets.flatten())


def _worker(rank: int, world: int, out_dir: str) -> None:
    module = make_module(num_hidden_layers=3, mtp=False)
    shard_experts(
        module, rank, world, lambda name, e: AllToAllTokenDispatcher(Comm(None, 60.0, name), e, world)
    )
    hook = InterleavedOverlap()
    layers = hook.attach(module)
    microbatches = make_tokens(8, seed=rank).chunk(4)  # each rank its own tokens
    result = {"layers": layers}
    for mode in ("sequential", "overlapped"):
        module.zero_grad(set_to_none=True)
        hook.interleaver.stats.reset()
        interleaver = hook.interleaver if mode == "overlapped" else None
        losses = [loss.item() for loss in one_f_one_b(lambda mb: _loss(module, mb), microbatches, interleaver)]
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        result[mode] = (losses, grads, hook.interleaver.stats.collectives, hook.interleaver.stats.in_pairs)
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))


def test_overlapped_pairs_equal_sequential_ones_with_expert_parallelism(tmp_path):
    world = 2
    fork_ranks(_worker, world, tmp_path)
    for rank in range(world):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert result["layers"] >= 2
        losses, grads, collectives, in_pairs = result["sequential"]
        o_losses, o_grads, o_collectives, o_in_pairs = result["overlapped"]
        assert o_losses == losses
        assert grads.keys() == o_grads.keys()
        assert any("experts" in n for n in grads)
        for name, grad in grads.items():
            assert torch.equal(o_grads[name], grad), name
        assert o_collectives == collectives > 0
        assert in_pairs == 0
        # 3 pairs; per MoE layer a forward issues 3 collectives (counts, dispatch, combine) and a backward
        # 2: every one of the forward chunks' collectives, and the backward's until its forward ends (more
        # than the forward's alone: the backward's all-to-alls, run by autograd on the worker, took turns too)
        assert o_in_pairs > 3 * 3 * result["layers"]
