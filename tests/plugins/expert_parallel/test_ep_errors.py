"""Bad input gets a clear error naming the YAML key, the value and the fix, before any process starts
where possible."""

from __future__ import annotations

import lightning as L
import pytest
from dsv3_lightning.plugins.expert_parallel import ExpertParallelStrategy
from dsv3_lightning.plugins.parallel.mesh import mesh_shape
from dsv3_lightning.plugins.expert_parallel.node_limited import apply_node_limit, node_groups
from ep_tiny import make_module


def test_expert_parallel_size_must_be_positive():
    with pytest.raises(ValueError, match=r"trainer.strategy.init_args.expert_parallel_size \(0\) must be >= 1"):
        ExpertParallelStrategy(0)


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match=r"trainer.strategy.init_args.timeout \(0\) must be a positive"):
        ExpertParallelStrategy(2, timeout=0)


def test_world_size_the_mesh_cannot_split_fails_when_the_trainer_is_built():
    with pytest.raises(ValueError, match=r"trainer.devices x trainer.num_nodes \(3\) must be a multiple of .*"
                       r"expert_parallel_size \(2\).*set trainer.devices to a multiple of 2"):
        L.Trainer(accelerator="cpu", devices=3, strategy=ExpertParallelStrategy(2, start_method="fork"), logger=False)
    assert mesh_shape(8, 1, 4) == (1, 2, 4) and mesh_shape(16, 2, 4) == (2, 2, 4)


def test_experts_not_divisible_by_expert_parallel_size():
    module = make_module(mtp=False, n_routed_experts=6, n_group=1, topk_group=1)
    with pytest.raises(ValueError, match=r"model.config.n_routed_experts \(6, layer model.model.layers.1.mlp\) must be "
                       r"divisible by trainer.strategy.init_args.expert_parallel_size \(4\)"):
        ExpertParallelStrategy(4).connect(module)


def test_model_without_moe_layers():
    module = make_module(mtp=False, first_k_dense_replace=2)
    with pytest.raises(ValueError, match=r"shards MoE layers, but the model has none \(model.config.first_k_dense_replace "
                       r"2 >= num_hidden_layers 2\): lower model.config.first_k_dense_replace, or set "
                       r"trainer.strategy.init_args.expert_parallel_size to 1"):
        ExpertParallelStrategy(2).connect(module)


def test_mesh_needs_a_process_group():
    with pytest.raises(RuntimeError, match="mesh exists only after Trainer setup"):
        _ = ExpertParallelStrategy(2).mesh


def test_node_limited_routing_errors():
    with pytest.raises(ValueError, match=r"max_nodes_per_token \(0\) must be >= 1"):
        ExpertParallelStrategy(2, max_nodes_per_token=0)
    with pytest.raises(ValueError, match=r"ranks_per_node \(3\) must divide .*expert_parallel_size \(4\)"):
        node_groups(4, 3)
    routers = make_module(mtp=False).model.routers()  # n_group 4, topk_group 2
    with pytest.raises(ValueError, match=r"model.config.n_group \(4\) and topk_group \(2\) do not match node-limited "
                       r"routing over 2 nodes with trainer.strategy.init_args.max_nodes_per_token \(1\)"):
        apply_node_limit(routers, 1, 2)
    with pytest.warns(UserWarning, match=r"max_nodes_per_token \(2\) >= the 2 node\(s\).*changes nothing"):
        apply_node_limit(routers, 2, 2)
    routers = make_module(mtp=False, num_experts_per_tok=4, n_group=1, topk_group=1).model.routers()
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(4\) experts do not fit on .*max_nodes_per_token \(1\) "
                       r"nodes of 2 experts"):
        apply_node_limit(routers, 1, 4)
