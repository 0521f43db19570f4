"""model.trainable: freezing by name pattern, the routed experts' learning rate, counts and errors;
a short fit leaves frozen parameters bit for bit as they were."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from dsv3_lightning import ModelConfig
from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.trainable import Trainable

SHAPE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
    max_position_embeddings=32,
)  # fmt: skip


def _module(**trainable) -> DSV3LightningModule:
    torch.manual_seed(0)
    return DSV3LightningModule(ModelConfig(**SHAPE), trainable=trainable, warmup_steps=0, learning_rate=1e-2)


def _fit(module: DSV3LightningModule, tmp_path) -> None:
    tokens = torch.randint(0, 64, (16, 9), generator=torch.Generator().manual_seed(1))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(list(tokens), batch_size=4))


def test_frozen_routed_experts_do_not_move_and_the_rest_trains(tmp_path) -> None:
    module = _module(freeze=["*.mlp.experts.*"])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainable, total = module.trainable_parameters
    experts = sum(p.numel() for n, p in module.named_parameters() if ".mlp.experts." in n)
    assert total - trainable == experts > 0
    _fit(module, tmp_path)
    after = module.state_dict()
    for name in before:
        moved = not torch.equal(before[name], after[name])
        if ".mlp.experts." in name:
            assert not moved, name
        elif name.endswith("q_a_proj.weight") or name.endswith("shared_experts.up_proj.weight"):
            assert moved, name
    assert [n for n, p in module.named_parameters() if not p.requires_grad] == [
        n for n, _ in module.named_parameters() if ".mlp.experts." in n
    ]


def test_train_patterns_exempt_the_last_layer_from_freeze_everything(tmp_path) -> None:
    module = _module(freeze=["*"], train=["model.model.layers.2.*", "model.lm_head.*"])
    trainable = {n for n, p in module.named_parameters() if not module.trainable.is_frozen(n)}
    assert trainable and all(n.startswith(("model.model.layers.2.", "model.lm_head.")) for n in trainable)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _fit(module, tmp_path)
    for name, value in module.state_dict().items():
        if name.endswith("weight") and "layernorm" not in name:
            assert torch.equal(before[name], value) == (name not in trainable), name


def test_expert_learning_rate_is_its_own_group() -> None:
    module = _module(expert_lr_scale=0.1)
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()  # what configure_optimizers reads
    optimizer = module.configure_optimizers()["optimizer"]
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3])
    expert_ids = {id(p) for n, p in module.named_parameters() if ".mlp.experts." in n}
    assert {id(p) for p in optimizer.param_groups[2]["params"]} == expert_ids


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"freeze": ["*.mlp.expert.*"]}, r"model\.trainable\.freeze\[0\] \('\*\.mlp\.expert\.\*'\) matches no parameter"),
        ({"freeze": ["*"], "train": ["layers.9.*"]}, r"model\.trainable\.train\[0\] \('layers\.9\.\*'\) matches no parameter"),
        ({"train": ["*"]}, r"model\.trainable\.train \(\['\*'\]\) only exempts parameters from model\.trainable\.freeze"),
        ({"expert_lr_scale": 0.0}, r"model\.trainable\.expert_lr_scale \(0\.0\) must be > 0"),
    ],
)
def test_errors(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        _module(**options)


def test_the_options_round_trip_through_hparams() -> None:
    module = _module(freeze=["*.mlp.experts.*"], expert_lr_scale=0.5)
    again = DSV3LightningModule.from_hparams(dict(module.hparams))
    assert again.trainable == Trainable(freeze=["*.mlp.experts.*"], expert_lr_scale=0.5)
