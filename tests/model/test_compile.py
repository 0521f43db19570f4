"""``compile_blocks``: compiled attention and dense MLP blocks compute what eager ones do (with
activation recomputation inside the compiled block too), and a compiled model copies and pickles."""

from __future__ import annotations

import copy
import pickle

import torch
import torch.nn.functional as F
from dsv3_lightning.plugins.mtp import MultiTokenPrediction

from dsv3_lightning import preset
from dsv3_lightning.module import DSV3LightningModule

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)


def loss_and_grads(compiled: bool, tokens: torch.Tensor):
    torch.manual_seed(0)
    module = DSV3LightningModule(
        preset("tiny", **SHAPE), [MultiTokenPrediction(1)], compile_blocks=compiled, recompute_activations=compiled
    )
    inputs, targets = module._split(tokens)
    loss = F.cross_entropy(module.model(inputs).logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.item(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}, module


def test_compiled_blocks_match_eager_and_copy():
    tokens = torch.randint(0, 64, (2, 18), generator=torch.Generator().manual_seed(0))
    want_loss, want_grads, _ = loss_and_grads(False, tokens)
    loss, grads, module = loss_and_grads(True, tokens)
    assert abs(loss - want_loss) <= 1e-6 * abs(want_loss)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    dense, moe = module.model.model.layers
    assert hasattr(dense._compiled[0], "_torchdynamo_orig_callable")  # attention block
    assert hasattr(dense._compiled[1], "_torchdynamo_orig_callable")  # dense MLP block
    assert not hasattr(moe._compiled[1], "_torchdynamo_orig_callable")  # the routed MLP stays eager
    assert module.heads[0].layers[0].compile_options == {}  # the MTP module's block is compiled too


def test_a_copy_of_a_compiled_model_compiles_its_own_blocks():
    module = DSV3LightningModule(preset("tiny", **SHAPE), compile_blocks=True)
    for layer in module.model.model.layers:
        layer._compiled_blocks()  # what the first forward does (torch.compile itself is lazy)
    clone = copy.deepcopy(module)  # the compiled functions are bound to the original's weights: not copied
    assert all(layer._compiled is None and layer.compile_options == {} for layer in clone.model.model.layers)
    assert module.model.model.layers[0]._compiled is not None
    assert pickle.loads(pickle.dumps(module)).model.model.layers[1]._compiled is None
