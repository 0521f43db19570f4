"""Named model shapes: a plain dict from name to ModelConfig keyword arguments.

``tiny`` trains on a 2-core CPU in minutes and still has every part of the architecture (compressed
queries, group-limited sigmoid routing, a shared expert, a dense first layer). ``small`` is the
throughput-benchmark shape. ``16B`` is DeepSeek-V2-Lite's shape (softmax routing, uncompressed
queries) and ``671B`` DeepSeek-V3's, as in their released config.json files: both build on the meta
device for parameter counting; nobody trains them on a CPU.
"""

from __future__ import annotations

from typing import Any

from dsv3_lightning.config import ModelConfig, YarnRopeScaling


def preset_kwargs() -> dict[str, dict[str, Any]]:
    """The presets, rebuilt on each call so that no caller can mutate a shared copy."""
    return {
        "tiny": dict(
            vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
            num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
            q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
            n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, max_position_embeddings=1024,
        ),
        "small": dict(
            vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
            num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8,
            q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
            n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
            routed_scaling_factor=2.5, max_position_embeddings=2048,
        ),
        "16B": dict(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
            q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
            routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax",
            max_position_embeddings=163840,
            rope_scaling=YarnRopeScaling(factor=40, mscale=0.707, mscale_all_dim=0.707),
        ),
        "671B": dict(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
            q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
            routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
            max_position_embeddings=163840, num_nextn_predict_layers=1,
            rope_scaling=YarnRopeScaling(factor=40, mscale=1.0, mscale_all_dim=1.0),
        ),
    }


def preset(name: str, **overrides: Any) -> ModelConfig:
    """``preset("tiny", num_hidden_layers=2)``: a named shape with some fields changed."""
    presets = preset_kwargs()
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(presets)}")
    return ModelConfig.from_dict({**presets[name], **overrides}, source=f"preset {name!r}")
