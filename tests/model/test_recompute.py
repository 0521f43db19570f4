"""Activation recomputation (RMSNorm + MLA up-projections): same numbers, fewer saved activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3_lightning import preset
from dsv3_lightning.module import DSV3LightningModule

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)


def saved_bytes_and_grads(recompute: bool, tokens: torch.Tensor) -> tuple[int, dict[str, torch.Tensor], float]:
    """Bytes autograd keeps for backward (each storage once), the gradients and the loss."""
    torch.manual_seed(0)
    module = DSV3LightningModule(preset("tiny", **SHAPE), recompute_activations=recompute)
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = module.model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return sum(storages.values()), {n: p.grad for n, p in module.named_parameters()}, loss.item()


def test_recomputation_gives_the_same_gradients_and_saves_activations():
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0))
    plain_bytes, plain_grads, plain_loss = saved_bytes_and_grads(False, tokens)
    recomputed_bytes, grads, loss = saved_bytes_and_grads(True, tokens)
    assert loss == plain_loss
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-8, msg=name)
    assert recomputed_bytes < 0.8 * plain_bytes


def test_recomputation_reaches_the_mtp_blocks():
    from dsv3_lightning.plugins.mtp import MultiTokenPrediction

    module = DSV3LightningModule(preset("tiny", **SHAPE), [MultiTokenPrediction(1)], recompute_activations=True)
    assert module.heads[0].layers[0].recompute and module.heads[0].layers[0].self_attn.recompute_up_projections
