"""The model's own contract: API, shapes, routing invariants, the grouped-matmul seam, dtypes."""

from __future__ import annotations

import pytest
import torch

from dsv3_lightning import DeepSeekV3, preset
from dsv3_lightning.model.moe import GroupedExperts

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             max_position_embeddings=64)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DeepSeekV3(preset("tiny", **SMALL))


def test_logits_shape_and_hidden_states(model):
    ids = torch.randint(0, 256, (3, 20))
    out = model(ids)
    assert out.logits.shape == (3, 20, 256)
    assert out.hidden_states.shape == (3, 20, 64)
    torch.testing.assert_close(model.head(out.hidden_states), out.logits)


def test_causal(model):
    ids = torch.randint(0, 256, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    torch.testing.assert_close(model(ids).logits[:, :10], model(changed).logits[:, :10])


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match=r"max_position_embeddings \(64\)"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(torch.zeros(65, dtype=torch.long))


def test_every_token_is_routed_to_k_distinct_experts_in_kept_groups(model):
    model.train()
    model(torch.randint(0, 256, (2, 32)))
    for router in model.routers():
        stats = router.last_stats
        ids = stats.topk_ids_TK
        assert ids.shape == (64, router.top_k)
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct
        groups = ids // (router.num_experts // router.n_group)
        assert all(len(set(row.tolist())) <= router.topk_group for row in groups)
        assert stats.tokens_per_expert_E.sum() == 64 * router.top_k  # no token dropped
        assert torch.equal(router.pop_tokens_per_expert(), stats.tokens_per_expert_E.float())
        assert router.tokens_per_expert_sum.sum() == 0


def test_selection_bias_changes_choice_not_weights(model):
    router = model.routers()[0]
    x = torch.randn(8, 64)
    ids, weights = router(x)
    router.e_score_correction_bias[ids[:, 0].unique()] -= 10.0  # push the favourite experts out
    ids2, weights2 = router(x)
    assert not torch.equal(ids, ids2)
    scores = router.scores(x)
    expected = scores.gather(1, ids2)
    torch.testing.assert_close(weights2, expected / expected.sum(-1, keepdim=True) * router.routed_scaling_factor)


def test_grouped_mm_matches_a_per_expert_loop():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8)
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16, requires_grad=True)
    y = experts(x, counts)
    reference, start = [], 0
    for e, n in enumerate(counts.tolist()):
        gate, up = (x[start : start + n] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        reference.append((torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T)
        start += n
    torch.testing.assert_close(y, torch.cat(reference), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert experts.gate_up_proj.grad[1].abs().sum() == 0 and experts.gate_up_proj.grad[0].abs().sum() > 0


def test_bias_stays_float32_when_model_is_cast(model):
    router = model.routers()[0]
    router.e_score_correction_bias.fill_(1e-4 + 1e-9)
    model.to(torch.bfloat16)
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.e_score_correction_bias[0].item() == pytest.approx(1e-4 + 1e-9, rel=1e-6)
    assert router.weight.dtype == torch.bfloat16
