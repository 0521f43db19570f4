"""Gradient accumulation on conversations is exact: the data order gives each optimizer step's global
target counts (``DSV3DataModule.step_counts``), so A accumulated batches of b windows train as one
batch of A·b windows does, whatever the targets in each."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from dsv3_lightning.plugins.mtp import MultiTokenPrediction

from dsv3_lightning import preset
from dsv3_lightning.batch import Batch
from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.tokenizer import EOS_TOKEN, train_tokenizer

SHAPE = dict(
    vocab_size=320, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=64,
)  # fmt: skip
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """Conversations of uneven answer lengths (so that batches hold unequal target counts) and a tokenizer."""
    root = tmp_path_factory.mktemp("conversations")
    lines = []
    for i in range(60):
        question = f"What is {WORDS[i % 12]} {i}?"
        answer = " ".join(WORDS[(i + j) % 12] for j in range(1 + (i * 7) % 9))
        lines.append({"prompt": question, "completion": answer})
    path = root / "qa.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    texts = [f"User: {line['prompt']}\n\nAssistant: {line['completion']}{EOS_TOKEN}\n\n" for line in lines]
    tokenizer = root / "tokenizer.json"
    train_tokenizer(texts * 3, vocab_size=320).save(str(tokenizer))
    return path, tokenizer


def datamodule(data, batch_size: int) -> DSV3DataModule:
    path, tokenizer = data
    return DSV3DataModule(
        conversations={"path": str(path), "chat_template": "dsv3_plain"}, tokenizer_path=str(tokenizer),
        vocab_size=320, seq_len=40, extra_tokens=1, batch_size=batch_size, val_fraction=0.1,
        cache_dir=str(path.parent / "cache"),
    )  # fmt: skip


def train(data, tmp_path: Path, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = DSV3LightningModule(preset("tiny", **SHAPE), [MultiTokenPrediction(1)], warmup_steps=0, learning_rate=1e-2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, accumulate_grad_batches=accumulation, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule(data, batch_size))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_each_window_counts_its_targets_as_the_loss_does(data):
    dm = datamodule(data, 2)
    dm.setup("fit")
    windows = dm.train_dataset
    table = windows.target_counts
    for i in range(len(windows)):
        read = Batch.read({k: v[None] for k, v in windows[i].items()}, 40, offsets=2)
        assert table[i].tolist() == read.counts.tolist(), i
    assert len(set(table[:, 1].tolist())) > 3  # the windows' target counts differ


def test_accumulated_batches_train_as_one_batch(data, tmp_path, monkeypatch):
    whole = train(data, tmp_path / "whole", batch_size=4, accumulation=1)
    accumulated = train(data, tmp_path / "accumulated", batch_size=2, accumulation=2)
    moved = max((whole[k] - accumulated[k]).abs().max().item() for k in whole if whole[k].is_floating_point())
    assert moved < 1e-5, moved
    # Each accumulated batch normalised by its own count (the old way) trains differently here.
    monkeypatch.setattr(DSV3DataModule, "step_counts", None)
    with pytest.warns(UserWarning, match="the data gives no step counts"):
        own = train(data, tmp_path / "own", batch_size=2, accumulation=2)
    assert max((whole[k] - own[k]).abs().max().item() for k in whole if whole[k].is_floating_point()) > 1e-4


def test_a_steps_counts_cover_every_replicas_windows_of_its_accumulated_batches(data):
    """What each of 2 replicas' samplers yields for the batches of one optimizer step, summed, is what
    ``step_counts`` reads from the global order (a step cut short by the epoch's end too)."""
    from dsv3_lightning.data.sampling import GlobalOrderSampler

    dm = datamodule(data, 2)
    dm.setup("fit")
    table = dm.train_dataset.target_counts
    samplers = [
        GlobalOrderSampler(dm._order(), num_windows=len(dm.train_dataset), num_replicas=2, rank=r, batch_size=2)
        for r in range(2)
    ]
    batches = [list(torch.tensor(list(s)).view(-1, 2)) for s in samplers]  # per replica: its batches' windows
    num_batches = samplers[0].batches_per_epoch
    dm._sampler = samplers[0]
    for accumulation in (1, 2, 3):
        for batch_idx in range(num_batches):
            first = batch_idx - batch_idx % accumulation
            step = range(first, min(first + accumulation, num_batches))
            want = sum(table[batches[r][b].numpy()].sum(0) for r in range(2) for b in step)
            assert dm.step_counts(0, batch_idx, accumulation, num_batches).tolist() == want.tolist()
