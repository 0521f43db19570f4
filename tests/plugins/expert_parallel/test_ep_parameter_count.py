"""The logged parameter counts describe the whole model, also on a rank that holds a shard of the experts."""

from __future__ import annotations

from dsv3_lightning.plugins.expert_parallel.sharding import shard_experts
from ep_tiny import make_module


def test_parameter_count_of_a_sharded_model_is_the_whole_models():
    module = make_module(mtp=False)
    full = module.model.num_parameters()
    shard_experts(module.model, expert_rank=1, expert_parallel_size=2, make_dispatcher=lambda name, e: None)
    assert module.model.moe_layers()[0].experts.gate_up_proj.shape[0] == module.model.config.n_routed_experts // 2
    assert sum(p.numel() for p in module.model.parameters()) < full[0]
    assert module.model.num_parameters() == full
