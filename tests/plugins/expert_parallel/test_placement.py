"""The redundant-expert placement (placement.py) as a pure function, the replica choice of the
dispatcher, reading recorded loads, and every error of the option (replicas.py, strategy.py)."""

from __future__ import annotations

import pytest
import torch
from ep_tiny import make_module
from dsv3_lightning.plugins.expert_parallel import ExpertParallelStrategy
from dsv3_lightning.sharded_checkpoint import save
from dsv3_lightning.plugins.expert_parallel.placement import (
    ExpertPlacement,
    balanced_packing,
    imbalance,
    place_experts,
    replicate_experts,
)
from dsv3_lightning.plugins.expert_parallel.replicas import (
    ReplicaTokenDispatcher,
    check_loads,
    checked_placement,
    read_expert_loads,
)


def zipf_loads(num_layers: int, num_experts: int, exponent: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Each layer: expert loads 1/rank^exponent, in a random order of the experts."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    return torch.stack(
        [(1e6 / ranks**exponent)[torch.randperm(num_experts, generator=g)] for _ in range(num_layers)]
    )


@pytest.mark.parametrize(
    ("num_experts", "extra", "ranks", "nodes", "groups"),
    [
        (8, 0, 2, 1, 1),
        (8, 2, 2, 1, 4),
        (16, 4, 4, 1, 4),
        (16, 8, 4, 2, 4),
        (16, 4, 4, 2, 3),
        (64, 32, 16, 4, 8),
    ],
)
def test_every_expert_placed_and_counts_add_up(num_experts, extra, ranks, nodes, groups):
    """groups 3 do not tile 2 nodes: the flat placement (EPLB's global policy)."""
    g = torch.Generator().manual_seed(num_experts + extra)
    load = torch.rand(3, num_experts, generator=g, dtype=torch.float64) ** 3 * 1000
    P = num_experts + extra
    placement = place_experts(load, P, ranks, num_nodes=nodes, num_groups=groups)
    placement.check(3, num_experts)  # the three maps agree, every expert has a slot
    assert placement.physical_to_logical.shape == (3, P)
    assert (placement.replica_counts >= 1).all()
    assert (placement.replica_counts.sum(-1) == P).all()
    for layer in range(3):
        for expert in range(num_experts):
            slots = placement.logical_to_physical[layer, expert]
            slots = slots[slots >= 0]
            assert len(slots) == placement.replica_counts[layer, expert]
            assert (placement.physical_to_logical[layer, slots] == expert).all()
    # the predicted rank loads conserve the tokens
    torch.testing.assert_close(placement.rank_loads(load).sum(-1), load.sum(-1))
    assert torch.equal(
        place_experts(load, P, ranks, num_nodes=nodes, num_groups=groups).physical_to_logical,
        placement.physical_to_logical,
    )  # deterministic


def test_balance_improves_on_zipf_loads_flat():
    load = zipf_loads(4, 256)
    even = imbalance(ExpertPlacement.even(4, 256, 64).rank_loads(load))
    packed = imbalance(place_experts(load, 256, 64).rank_loads(load))
    placed = imbalance(place_experts(load, 256 + 64, 64).rank_loads(load))
    more = imbalance(place_experts(load, 256 + 128, 64).rank_loads(load))
    assert (even > 5).all()  # one expert carries ~16 % of the tokens: 10x a rank's mean
    assert (packed <= even).all()  # no copies: packing alone cannot split the heaviest expert
    assert (placed < 0.2 * even).all() and (more <= placed + 1e-9).all(), (even, placed, more)
    # a lower bound no placement beats: the heaviest expert split over all its copies, on one rank each
    placement = place_experts(load, 256 + 64, 64)
    per_copy = (load / placement.replica_counts).amax(-1)
    assert (imbalance(placement.rank_loads(load)) >= per_copy / (load.sum(-1) / 64) - 1e-9).all()


def test_hierarchical_keeps_each_group_on_one_node():
    """256 experts in 8 groups on 8 nodes x 8 ranks: a token limited to 4 groups reaches <= 4 nodes."""
    load = zipf_loads(2, 256, exponent=0.8, seed=3)
    placement = place_experts(load, 256 + 64, 64, num_nodes=8, num_groups=8)
    node_of_slot = torch.arange(320) // 40  # 5 slots per rank, 8 ranks per node
    group_of = placement.physical_to_logical // 32
    for layer in range(2):
        for group in range(8):
            assert len(node_of_slot[group_of[layer] == group].unique()) == 1
    # at most one copy of an expert per rank, and no more copies than the node's ranks
    assert (placement.replica_counts <= 8).all()
    for layer in range(2):
        for rank in range(64):
            held = placement.rank_slots(rank)[layer]
            assert len(held.unique()) == len(held)
    # the balance improves over the even layout, and on nodes it cannot beat the group packing's
    even = imbalance(ExpertPlacement.even(2, 256, 64).rank_loads(load))
    after = imbalance(placement.rank_loads(load))
    node_loads = placement.rank_loads(load).view(2, 8, 8).sum(-1)
    assert (after < even).all() and (after >= imbalance(node_loads) - 1e-9).all()


def test_balanced_packing_and_replication_steps():
    pack, index = balanced_packing(torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 3.0]]), 2)
    totals = torch.zeros(2).index_add_(0, pack[0], torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 3.0]))
    assert totals.tolist() == [9.0, 9.0] and sorted(pack[0].tolist()) == [0, 0, 0, 1, 1, 1]
    assert sorted(zip(pack[0].tolist(), index[0].tolist())) == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    phy2log, replica, counts = replicate_experts(torch.tensor([[9.0, 1.0, 3.0]]), 6)
    assert counts.tolist() == [[4, 1, 1]] and phy2log[0, 3:].tolist() == [0, 0, 0]
    assert replica[0].tolist() == [0, 0, 0, 1, 2, 3]
    _, _, capped = replicate_experts(torch.tensor([[9.0, 1.0, 3.0]]), 6, max_replicas=2)
    assert capped.tolist() == [[2, 2, 2]]


def test_replica_choice_spreads_each_rank_copies_evenly():
    placement = ExpertPlacement.from_physical_to_logical(torch.tensor([[0, 1, 0, 2, 0, 3]]), 4, 3)
    inner = type(
        "Inner", (), {"dispatch": lambda self, x, ids, n: ids, "combine": lambda self, y, w, plan: y}
    )()
    ids = torch.tensor(
        [[0, 1], [0, 2], [0, 3], [0, 1], [0, 2], [0, 3], [1, 0]]
    )  # expert 0: 7 copies, 3 slots
    for rotation in range(3):
        dispatcher = ReplicaTokenDispatcher(
            inner, placement.logical_to_physical[0], placement.replica_counts[0], rotation
        )
        physical = dispatcher.dispatch(None, ids, 2)
        assert torch.equal(placement.physical_to_logical[0][physical], ids)  # the same logical experts
        per_slot = torch.bincount(physical.flatten(), minlength=6)
        assert sorted(per_slot[[0, 2, 4]].tolist()) == [2, 2, 3]
        assert per_slot[[0, 2, 4]].argmax() == rotation  # the first copy starts at the rotation
        assert torch.equal(dispatcher.tokens_per_slot_P, per_slot)


def test_loads_read_from_a_checkpoint_or_a_tensor_file(tmp_path):
    recent = [torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])]
    torch.save(
        {"state_dict": {}, "callbacks": {"ExpertLoadMonitor": {"recent": recent}}}, tmp_path / "run.ckpt"
    )
    assert read_expert_loads(tmp_path / "run.ckpt", "k").tolist() == [[1.0, 3.0], [4.0, 1.0]]
    save(
        tmp_path / "sharded.ckpt",
        {"callbacks": {"ExpertLoadMonitor": {"recent": recent}}, "x": torch.ones(1)},
        no_dist=True,
    )
    assert read_expert_loads(tmp_path / "sharded.ckpt", "k").tolist() == [
        [1.0, 3.0],
        [4.0, 1.0],
    ]  # a directory
    torch.save(torch.ones(2, 2), tmp_path / "loads.pt")
    assert read_expert_loads(tmp_path / "loads.pt", "k").tolist() == [[1.0, 1.0], [1.0, 1.0]]
    torch.save({"state_dict": {}, "callbacks": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(
        ValueError, match=r"expert_loads \(.*plain.ckpt\) holds no expert loads.*ExpertLoadMonitor"
    ):
        read_expert_loads(tmp_path / "plain.ckpt", "trainer.strategy.init_args.expert_loads")
    with pytest.raises(ValueError, match=r"expert_loads \(.*missing.pt\) does not exist"):
        read_expert_loads(tmp_path / "missing.pt", "trainer.strategy.init_args.expert_loads")


KEY = r"trainer\.strategy\.init_args"


def test_strategy_option_errors():
    with pytest.raises(ValueError, match=rf"{KEY}\.redundant_experts \(-1\) must be >= 0"):
        ExpertParallelStrategy(2, redundant_experts=-1)
    with pytest.raises(
        ValueError,
        match=rf"{KEY}\.redundant_experts \(3\) must be a multiple of {KEY}\.expert_parallel_size \(2\).*such as 4",
    ):
        ExpertParallelStrategy(2, redundant_experts=3)
    with pytest.raises(
        ValueError,
        match=rf"redundant_experts \(1\) .* but {KEY}\.expert_parallel_size is 1.*raise expert_parallel_size",
    ):
        ExpertParallelStrategy(1, redundant_experts=1)
    module = make_module(mtp=False)  # 8 experts: 2 ranks hold at most 8 + 8 slots
    ExpertParallelStrategy(2, redundant_experts=8).check_model(module)
    with pytest.raises(
        ValueError,
        match=rf"{KEY}\.redundant_experts \(10\) asks for 9 slots per rank, more than the 8 experts.*at most 8",
    ):
        ExpertParallelStrategy(2, redundant_experts=10).check_model(module)
    # 4 ranks as 2 nodes: a group's copies stay on its node's 2 ranks (4 experts): at most 8 extra
    ExpertParallelStrategy(4, redundant_experts=8, ranks_per_node=2).check_model(module)
    with pytest.raises(
        ValueError,
        match=rf"redundant_experts \(12\) asks for 5 slots per rank, more than the 4 experts of a node \({KEY}\.ranks_per_node 2\).*at most 8",
    ):
        ExpertParallelStrategy(4, redundant_experts=12, ranks_per_node=2).check_model(module)


def test_load_file_of_another_shape_is_refused():
    check_loads(torch.ones(2, 8), 2, 8, "k", "x")
    with pytest.raises(
        ValueError,
        match=rf"{KEY}\.expert_loads \(run.ckpt\) holds loads of shape \[3, 16\], but this model has 2 MoE layer\(s\).* of 8 experts.*this model shape",
    ):
        check_loads(torch.ones(3, 16), 2, 8, "trainer.strategy.init_args.expert_loads", "run.ckpt")


def test_placement_that_drops_an_expert_is_refused():
    def dropping(load, P, R, *, num_nodes=1, num_groups=1):
        phy2log = (
            torch.arange(P).remainder(load.shape[1] - 1).repeat(load.shape[0], 1)
        )  # never the last expert
        return ExpertPlacement.from_physical_to_logical(phy2log, load.shape[1], R)

    def wrong_slots(load, P, R, *, num_nodes=1, num_groups=1):
        return place_experts(load, P + R, R)

    load = zipf_loads(2, 8)
    placement = checked_placement(place_experts, load, 10, 2, num_nodes=1, num_groups=4, key="k")
    assert placement.num_physical_experts == 10
    with pytest.raises(
        ValueError,
        match=rf"{KEY}\.placement \(.*dropping\) drops expert 7 of layer 0.*fix the placement function",
    ):
        checked_placement(
            dropping, load, 10, 2, num_nodes=1, num_groups=4, key="trainer.strategy.init_args.placement"
        )
    with pytest.raises(
        ValueError, match=r"placed 12 physical experts on 2 ranks; this run has 10.*fix the placement"
    ):
        checked_placement(
            wrong_slots, load, 10, 2, num_nodes=1, num_groups=4, key="trainer.strategy.init_args.placement"
        )


def test_pure_function_errors():
    load = zipf_loads(1, 8)
    with pytest.raises(
        ValueError, match=r"9 physical experts for 8 experts over 2 ranks: .* a multiple of the ranks"
    ):
        place_experts(load, 9, 2)
    with pytest.raises(
        ValueError,
        match=r"20 physical experts over 2 ranks is 10 slots per rank, more than the 8 experts.*at most 8 extra",
    ):
        place_experts(load, 20, 2)
    with pytest.raises(
        ValueError,
        match=r"12 physical experts over 4 ranks is 3 slots per rank, more than the 2 experts of a node.*at most 0 extra",
    ):
        place_experts(load, 12, 4, num_nodes=4, num_groups=4)
    with pytest.raises(ValueError, match="finite and non-negative"):
        place_experts(-load, 8, 2)


def test_placement_function_is_named_by_its_dotted_path_in_yaml():
    """The swap point as the CLI reads it: ``trainer.strategy.init_args.placement: <dotted path>``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ExpertParallelStrategy, "strategy")
    config = parser.parse_args([
        "--strategy.expert_parallel_size=2",
        "--strategy.redundant_experts=2",
        "--strategy.placement=dsv3_lightning.plugins.expert_parallel.placement.place_experts",
    ])
    strategy = parser.instantiate_classes(config).strategy
    assert strategy.placement_fn is place_experts and strategy.redundant_experts == 2
