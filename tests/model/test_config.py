"""ModelConfig validation and the presets' parameter counts (SPEC.md: 671B total, 37B activated)."""

from __future__ import annotations

import pytest
import torch

from dsv3_lightning import DeepSeekV3, ModelConfig, preset


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        (dict(n_routed_experts=10, n_group=4), ["model.config.n_routed_experts (10)", "n_group (4)", "divisible"]),
        (dict(topk_group=5, n_group=4), ["model.config.topk_group (5)", "at most model.config.n_group (4)"]),
        (dict(num_experts_per_tok=9), ["model.config.num_experts_per_tok (9)", "8 experts in the kept groups", "raise topk_group"]),
        (dict(qk_rope_head_dim=15), ["model.config.qk_rope_head_dim (15)", "even"]),
        (dict(first_k_dense_replace=5), ["model.config.first_k_dense_replace (5)", "at most 4"]),
        (dict(hidden_size=0), ["model.config.hidden_size (0)", "positive integer"]),
        (dict(q_lora_rank=0), ["model.config.q_lora_rank (0)", "null"]),
        (dict(scoring_func="relu"), ["model.config.scoring_func ('relu')", "'sigmoid' or 'softmax'"]),
        (dict(rope_scaling=dict(factor=0.5)), ["model.config.rope_scaling.factor (0.5)", ">= 1"]),
        (dict(n_group=16, topk_group=8), ["model.config.n_group (16)", "top-2", "at most 8 groups"]),
    ],
)
def test_inconsistent_shapes_name_key_value_and_fix(changes, fragments):
    with pytest.raises(ValueError) as err:
        preset("tiny", **changes)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'n_routed_expert' \(did you mean 'n_routed_experts'\?\)"):
        preset("tiny", n_routed_expert=8)


def test_yarn_dict_is_coerced_and_scales_softmax():
    config = preset("tiny", rope_scaling=dict(factor=40.0, mscale=1.0, mscale_all_dim=1.0))
    mscale = 0.1 * torch.log(torch.tensor(40.0)).item() + 1
    assert config.softmax_scale == pytest.approx(config.qk_head_dim**-0.5 * mscale**2)


def _count_on_meta(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        return DeepSeekV3(preset(name)).num_parameters()


def test_671b_preset_has_v3_parameter_counts():
    total, activated = _count_on_meta("671B")
    # SPEC.md: 671B total, 37B activated (the main model, MTP module excluded).
    assert 670.5e9 < total < 671.5e9
    assert 37.0e9 < activated < 38.0e9


def test_16b_preset_has_v2_lite_parameter_counts():
    total, activated = _count_on_meta("16B")
    assert 15.5e9 < total < 16.0e9  # DeepSeek-V2-Lite: 15.7B total, 2.4B activated without embeddings
    assert 2.5e9 < activated < 2.8e9


def test_config_round_trips_through_dict():
    config = preset("16B")
    assert ModelConfig.from_dict(config.to_dict()) == config
