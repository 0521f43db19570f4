"""``compile_blocks``: the compiled attention blocks, norms and dense MLPs compute what eager ones do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dsv3_lightning.plugins.mtp import MultiTokenPrediction

from dsv3_lightning import preset
from dsv3_lightning.module import DSV3LightningModule

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)


def loss_and_grads(compile_blocks: bool, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], object]:
    torch.manual_seed(0)
    module = DSV3LightningModule(preset("tiny", **SHAPE), [MultiTokenPrediction(1)], compile_blocks=compile_blocks)
    inputs, targets = module._split(tokens)
    out = module.model(inputs)
    loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.item(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}, module


def test_compiled_blocks_match_eager():
    tokens = torch.randint(0, 64, (2, 18), generator=torch.Generator().manual_seed(0))
    want_loss, want_grads, _ = loss_and_grads(False, tokens)
    loss, grads, module = loss_and_grads(True, tokens)
    assert abs(loss - want_loss) <= 1e-6 * abs(want_loss)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for block in [*module.model.model.layers, module.heads[0].layers[0]]:  # the MTP module's block too
        assert hasattr(block.attention_block, "_torchdynamo_orig_callable"), "not compiled"
