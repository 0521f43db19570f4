"""The two-hop (node-deduplicated) dispatcher on 4 gloo processes as 2 nodes x 2 ranks: the same
outputs and gradients as the one-hop all-to-all dispatcher, at most one row per (token, remote node)
across nodes, both hops through the (F;B) overlap hook, and a training run through
ExpertParallelStrategy(expert_parallel_size=4, ranks_per_node=2) equal to one process."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from dsv3_lightning.plugins.expert_parallel import ExpertParallelStrategy
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.two_hop import NodeDedupTokenDispatcher
from dsv3_lightning.plugins.parallel.mesh import ParallelMesh
from ep_launch import run_ranks
from ep_tiny import fit, make_tokens, relative_errors

E, K, D, R, PER_NODE = 8, 3, 16, 4, 2  # 2 experts per rank, node 0: experts 0-3, node 1: 4-7


def routing(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank 3 has no tokens; the others: random distinct experts plus tokens whose experts are all on
    node 0, all on node 1, or on both nodes."""
    if rank == 3:
        return torch.empty(0, D), torch.empty(0, K, dtype=torch.long), torch.empty(0, K)
    g = torch.Generator().manual_seed(rank)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(9)])
    # experts on node 0, node 0, node 1, both, both
    crafted = torch.tensor([[0, 1, 2], [2, 3, 0], [7, 4, 6], [5, 1, 6], [3, 4, 0]])
    ids = torch.cat([ids, crafted])
    return torch.randn(len(ids), D, generator=g), ids, torch.rand(len(ids), K, generator=g)


def experts(x_ND: torch.Tensor, tokens_per_expert: torch.Tensor, weights_EDD: torch.Tensor, offset: int):
    expert = torch.arange(len(tokens_per_expert)).repeat_interleave(tokens_per_expert) + offset
    return torch.tanh(torch.bmm(x_ND.unsqueeze(1), weights_EDD[expert]).squeeze(1))


def through(dispatcher, rank: int):
    x, ids, w = routing(rank)
    x.requires_grad_(), w.requires_grad_()
    weights = torch.randn(E, D, D, generator=torch.Generator().manual_seed(99)) / D**0.5
    x_ND, counts, plan = dispatcher.dispatch(x, ids, E // R)
    out = dispatcher.combine(experts(x_ND, counts, weights, rank * (E // R)), w, plan)
    (out * torch.linspace(-1, 1, D)).square().sum().backward()
    return out.detach(), x.grad, w.grad, ids


class Recorder:
    """An (F;B) overlap stand-in: waits at once and records which collective waited."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def wait(self, work, what: str) -> None:
        work.wait()
        self.seen.append(what)


def compare(rank: int, world: int):
    mesh = ParallelMesh.create(1, R, 30.0)
    two = mesh.dispatcher("test", E, ranks_per_node=PER_NODE)
    one = AllToAllTokenDispatcher(Comm(mesh.expert_group, 30.0, "test"), E, R, ranks_per_node=PER_NODE)
    assert isinstance(two, NodeDedupTokenDispatcher)
    assert mesh.dispatcher("x", E, ranks_per_node=PER_NODE).comm.group is two.comm.group  # groups made once
    want, got = through(one, rank), through(two, rank)
    counters = (one.last_internode_rows, two.last_internode_rows)
    counters += (one.last_internode_bytes, two.last_internode_bytes)
    two.comm.overlap = recorder = Recorder()
    again = through(two, rank)
    fp8_one = AllToAllTokenDispatcher(one.comm, E, R, fp8=True)
    fp8 = [through(d, rank) for d in (fp8_one, mesh.dispatcher("f", E, fp8=True, ranks_per_node=PER_NODE))]
    return want, got, counters, again, recorder.seen, fp8


def test_two_hops_equal_one_hop_and_cross_nodes_once_per_node():
    results = run_ranks(4, compare)
    assert all(status == "ok" for status, _ in results.values()), results
    for rank, (_, (want, got, counters, again, seen, fp8)) in sorted(results.items()):
        ids = want[3]
        for a, b in zip(want[:3], got[:3]):  # output, input gradient, gate-weight gradient
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(a, b) for a, b in zip(got[:3], again[:3]))  # the hook changes nothing
        for a, b in zip(fp8[0][:3], fp8[1][:3]):  # FP8 on hop 1: the same quantized rows as one hop's
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        node = rank // PER_NODE
        nodes_TK = ids // (E // 2)
        remote_copies = int((nodes_TK != node).sum())
        remote_nodes = sum(len(set(t.tolist()) - {node}) for t in nodes_TK)
        one_rows, two_rows, one_bytes, two_bytes = counters
        assert (one_rows, two_rows) == (remote_copies, remote_nodes)
        assert (one_bytes, two_bytes) == (remote_copies * D * 4, remote_nodes * D * 4)
        if rank != 3:
            assert two_rows < one_rows  # some tokens have 2+ experts on the other node
            assert any("intra-node" in w for w in seen) and any("inter-node" in w for w in seen)
            assert any(w.startswith("backward of the intra-node") for w in seen)


class TwoHopInstalled(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dispatchers = [m.dispatcher for m in pl_module.modules() if hasattr(m, "dispatcher")]
        assert dispatchers and all(isinstance(d, NodeDedupTokenDispatcher) for d in dispatchers), dispatchers


def test_ranks_per_node_two_trains_like_one_process(tmp_path):
    windows = make_tokens(16)
    want, want_losses, _ = fit(tmp_path / "one", 1, 1, max_steps=2, windows=windows)
    got, losses, _ = fit(
        tmp_path / "ep", 4, 4, max_steps=2, windows=windows, ranks_per_node=2, callbacks=[TwoHopInstalled()]
    )
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    errors = relative_errors(got.state_dict(), want.state_dict())
    assert max(errors.values()) < 1e-5, max(errors, key=errors.get)


def test_a_ranks_per_node_that_does_not_tile_the_expert_group_is_an_error():
    with pytest.raises(ValueError, match=r"trainer.strategy.init_args.ranks_per_node \(3\) must divide "
                       r"trainer.strategy.init_args.expert_parallel_size \(4\) \(an expert group spans whole "
                       r"nodes\) or be a multiple of it .*set ranks_per_node to the GPUs of one node"):
        ExpertParallelStrategy(4, ranks_per_node=3)
    with pytest.raises(ValueError, match=r"ranks_per_node \(0\) must divide"):
        ExpertParallelStrategy(4, ranks_per_node=0)
    ExpertParallelStrategy(4, ranks_per_node=8)  # expert groups inside one node: one hop
