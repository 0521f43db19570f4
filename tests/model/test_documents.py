"""Packed documents (fine-tuning on conversations): each packed document computes as if alone, and the
loss counts only its target tokens, at every depth of multi-token prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dsv3_lightning.plugins.mtp import MultiTokenPrediction

from dsv3_lightning import preset
from dsv3_lightning.batch import Batch
from dsv3_lightning.model.documents import document_mask, document_positions
from dsv3_lightning.module import DSV3LightningModule

SHAPE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=64,
)  # fmt: skip


def module(depth: int = 1, **changes) -> DSV3LightningModule:
    torch.manual_seed(0)
    heads = [MultiTokenPrediction(depth=depth)] if depth else []
    return DSV3LightningModule(preset("tiny", **{**SHAPE, **changes}), heads).eval()


def test_positions_restart_and_attention_stays_inside_each_run():
    documents = torch.tensor([[0, 0, 0, 1, 1, -1, -1, 0]])  # a reused id later is another run
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]
    mask = document_mask(documents)[0, 0]
    assert mask.tolist()[4] == [False, False, False, True, True, False, False, False]
    assert mask.tolist()[7] == [False] * 7 + [True]
    assert torch.equal(mask, mask.tril())


def test_a_packed_document_computes_as_if_alone():
    """Logits and the trunk's hidden states of two conversations packed with padding equal each one's alone."""
    model = module(0).model
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 64, (1, 5), generator=g), torch.randint(0, 64, (1, 9), generator=g)
    packed = torch.cat([a, b, torch.zeros(1, 4, dtype=torch.long)], 1)
    documents = torch.tensor([[0] * 5 + [1] * 9 + [-1] * 4])
    out = model(packed, documents)
    for alone, span in ((model(a), slice(0, 5)), (model(b), slice(5, 14))):
        scale = alone.logits.abs().max()
        assert (out.logits[:, span] - alone.logits).abs().max() <= 1e-6 * scale
        assert (out.hidden_states[:, span] - alone.hidden_states).abs().max() <= 1e-5
    unmasked = model(packed).logits[:, 5:14]  # without the documents the second one sees the first
    assert (unmasked - model(b).logits).abs().max() > 1e-3 * model(b).logits.abs().max()


def _conversation_batch(documents: list[list[int]], mask: list[list[int]], seed: int = 2) -> dict[str, torch.Tensor]:
    documents_t = torch.tensor(documents)
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, 64, documents_t.shape, generator=g),
        "loss_mask": torch.tensor(mask, dtype=torch.bool),
        "documents": documents_t,
    }


def test_the_loss_counts_target_tokens_of_the_same_document_only():
    # window of 10 = seq_len 8 + 1 + MTP depth 1; conversation 0 has 4 tokens, conversation 1 has 5
    batch = _conversation_batch([[0, 0, 0, 0, 1, 1, 1, 1, 1, -1]], [[0, 0, 1, 1, 1, 0, 1, 1, 0, 0]])
    read = Batch.read(batch, 8, offsets=2)
    # next token: targets at 2, 3 (conv 0) and 6, 7 (conv 1); token 4 is conv 1's first: predicted from conv 0
    assert read.target_mask(1)[0].nonzero().flatten().add(1).tolist() == [2, 3, 6, 7]
    assert read.target_mask(2)[0].nonzero().flatten().add(2).tolist() == [2, 3, 6, 7]
    assert read.global_count(0).item() == 8 and read.global_count(1).item() == 4
    logits = torch.randn(1, 8, 64)
    losses = F.cross_entropy(logits[0], batch["tokens"][0, 1:9], reduction="none")
    want = losses[[1, 2, 5, 6]].mean()
    assert torch.allclose(read.cross_entropy(logits), want, rtol=1e-6)
    assert torch.equal(Batch.read(batch["tokens"], 8).cross_entropy(logits), F.cross_entropy(logits[0], batch["tokens"][0, 1:9]))


def test_mtp_on_packed_conversations_equals_each_alone():
    """The MTP head's masked loss on a packed window is the target-weighted mean of its loss on each
    conversation alone: its modules attend inside each conversation and its targets stay inside."""
    lit = module(1, initializer_range=0.2)  # large weights: attention across conversations would show
    S = 12
    documents = [[0] * 6 + [1] * 7 + [-1] * 1]  # 6 + 7 tokens in the S + 1 = 13 positions, then padding
    mask = [[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0]]
    batch = _conversation_batch(documents, mask)
    read = lit.read_batch(batch)
    assert read.seq_len == S
    out = lit.model(read.inputs, read.input_documents)
    packed = lit.heads[0](out.hidden_states, read, lit.model, stage="val").logs["mtp_loss"]
    sums = counts = 0
    for span in (slice(0, 6), slice(6, 13)):
        alone = {k: v[:, span] for k, v in batch.items()}
        n = alone["tokens"].shape[1]
        alone = {k: torch.cat([v, v.new_zeros(1, 1)], 1) for k, v in alone.items()}  # the MTP token past the end
        alone_read = Batch.read(alone, n - 1, offsets=2)
        alone_out = lit.model(alone_read.inputs)
        loss = lit.heads[0](alone_out.hidden_states, alone_read, lit.model, stage="val").logs["mtp_loss"]
        count = alone_read.global_count(2)
        sums, counts = sums + loss * count, counts + count
    assert torch.allclose(packed, (sums / counts).float(), rtol=1e-5)


def test_validation_loss_is_the_mean_over_target_tokens():
    lit = module(0)
    batch = _conversation_batch([[0] * 5 + [1] * 4], [[0, 1, 1, 0, 0, 0, 1, 1, 1]])
    lit.validation_step(batch, 0)
    read = Batch.read(batch, 8)
    logits = lit.model(read.inputs, read.input_documents).logits
    losses = F.cross_entropy(logits[0], read.targets()[0], reduction="none")
    assert torch.allclose(lit.val_loss.compute(), losses[read.target_mask()[0]].mean(), rtol=1e-6)


def test_a_batch_dict_with_unknown_keys_is_refused():
    with pytest.raises(ValueError, match=r"a batch dict holds \['documents', 'loss_mask', 'tokens'\]"):
        Batch.read({"tokens": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4)}, 3)
