"""Load-balancing plugins: the bias rule, counting, the two losses, MaxVio, schedules and errors."""

from __future__ import annotations

import struct
import zlib

import lightning as L
import pytest
import torch
from dsv3_lightning.plugins.load_balancing import (
    AuxBalanceLoss,
    AuxLossFreeBalancing,
    ExpertLoadMonitor,
    SequenceBalanceLoss,
    balance_loss,
    max_violation,
    update_bias,
)
from dsv3_lightning.plugins.load_balancing.heatmap import load_heatmap, write_png
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from dsv3_lightning import preset
from dsv3_lightning.model.router import RouterStats
from dsv3_lightning.module import DSV3LightningModule

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
             max_position_embeddings=64)


def make_module(**changes) -> DSV3LightningModule:
    torch.manual_seed(0)
    return DSV3LightningModule(preset("tiny", **{**SHAPE, **changes}), warmup_steps=0, learning_rate=1e-2)


def batches(n: int, batch_size: int = 4, seq: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (batch_size, seq + 1), generator=g) for _ in range(n)]


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


def routed_counts(module: DSV3LightningModule, micro_batches: list[torch.Tensor]) -> torch.Tensor:
    """Tokens per (MoE layer, expert) of the given windows, by a plain forward of the current weights."""
    counts = 0
    with torch.no_grad():
        for tokens in micro_batches:
            module.model(tokens[:, :-1])
            counts = counts + torch.stack([r.last_stats.tokens_per_expert_E for r in module.model.routers()])
    return counts.float()


# --------------------------------------------------------------------------------------------- bias rule
def test_bias_rule_on_hand_computed_counts():
    counts = torch.tensor([[4.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 5.0]])  # means 2 and 2
    expected = torch.tensor([[-1e-3, 1e-3, 0.0, 0.0], [1e-3, 1e-3, 1e-3, -1e-3]])
    torch.testing.assert_close(update_bias(counts, 1e-3), expected)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_update_per_optimizer_step_from_all_micro_batches(accumulate):
    module = make_module()
    data = batches(accumulate)
    expected_counts = routed_counts(module, data)  # the first step's micro-batches see the initial weights
    L_layers = expected_counts.shape[0]
    trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[AuxLossFreeBalancing(0.01)]).fit(
        module, DataLoader(data, batch_size=None)
    )
    biases = torch.stack([r.e_score_correction_bias for r in module.model.routers()])
    assert biases.shape == (L_layers, 8) and biases.dtype == torch.float32
    torch.testing.assert_close(biases, update_bias(expected_counts, 0.01))
    assert biases.abs().sum() > 0
    assert all(not b.requires_grad for b in biases)
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(r.e_score_correction_bias) not in optimized for r in module.model.routers())


def test_freeze_schedule_stops_updates():
    module = make_module()
    trainer(max_steps=3, callbacks=[AuxLossFreeBalancing(0.01, freeze_at_step=1)]).fit(
        module, DataLoader(batches(3), batch_size=None)
    )
    # only step 0 moved the biases: every entry is 0 or ±0.01
    biases = torch.stack([r.e_score_correction_bias for r in module.model.routers()])
    assert ((biases.abs() == 0) | ((biases.abs() - 0.01).abs() < 1e-9)).all()
    assert biases.abs().max() > 0
    assert AuxLossFreeBalancing(freeze_at_fraction=0.5).rate(type("T", (), {"global_step": 5, "estimated_stepping_batches": 10})()) == 0


def test_recomputation_does_not_count_twice():
    module = make_module()
    router = module.model.routers()[0]
    router.train()
    x = torch.randn(2, 8, 32, requires_grad=True)
    for reentrant in (False, True):
        router.pop_tokens_per_expert()
        ids, weights = checkpoint(router, x, use_reentrant=reentrant)
        weights.sum().backward()
        assert router.pop_tokens_per_expert().sum() == 16 * 2, reentrant  # T·K, once


# --------------------------------------------------------------------------------------------- losses
def random_stats(B=3, S=5, E=8, K=2, seed=0) -> RouterStats:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B * S, E, generator=g).requires_grad_()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * S)])
    return RouterStats(scores, ids, torch.bincount(ids.flatten(), minlength=E), (B, S))


def direct_balance(stats: RouterStats, E: int, sequences: list[range]) -> torch.Tensor:
    K = stats.topk_ids_TK.shape[1]
    total = 0.0
    for tokens in sequences:
        T = len(tokens)
        loss = 0.0
        for i in range(E):
            f = E / (K * T) * sum(int(i in stats.topk_ids_TK[t].tolist()) for t in tokens)
            P = sum(stats.scores_TE[t, i] / stats.scores_TE[t].sum() for t in tokens) / T
            loss = loss + f * P
        total = total + loss
    return total / len(sequences)


def test_sequence_wise_loss_matches_formula():
    stats = random_stats()
    expected = direct_balance(stats, 8, [range(5), range(5, 10), range(10, 15)])
    torch.testing.assert_close(balance_loss(stats, 8, per_sequence=True), expected)


def test_batch_level_loss_matches_formula():
    stats = random_stats()
    torch.testing.assert_close(balance_loss(stats, 8, per_sequence=False), direct_balance(stats, 8, [range(15)]))


def test_losses_join_the_training_loss_with_gradient():
    module = make_module()
    seq, aux = SequenceBalanceLoss(1e-2), AuxBalanceLoss(1e-2)
    t = trainer(max_steps=1, callbacks=[seq, aux])
    t.fit(module, DataLoader(batches(1), batch_size=None))
    logged = t.callback_metrics
    assert logged["train/seq_balance_loss"] > 0 and logged["train/aux_balance_loss"] > 0
    total = logged["train/ce"] + logged["train/seq_balance_loss"] + logged["train/aux_balance_loss"]
    torch.testing.assert_close(logged["train/loss"], total)
    # the balance loss reaches the router weights
    module.model.train()
    module.model(batches(1)[0][:, :-1])
    router = module.model.routers()[0]
    grad = torch.autograd.grad(balance_loss(router.last_stats, 8, per_sequence=True), router.weight)[0]
    assert grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- metrics
def test_max_violation_by_hand():
    torch.testing.assert_close(max_violation(torch.tensor([[4.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])),
                               torch.tensor([1.0, 0.0]))


def test_monitor_val_max_vio_is_global_over_the_validation_set(tmp_path):
    module = make_module()
    val = batches(3, seed=7)
    t = trainer(max_steps=2, callbacks=[ExpertLoadMonitor(window=2)], default_root_dir=tmp_path,
                val_check_interval=2, limit_val_batches=3)
    t.fit(module, DataLoader(batches(2), batch_size=None), DataLoader(val, batch_size=None))
    module.eval()
    expected = max_violation(routed_counts(module, val)).mean()
    torch.testing.assert_close(t.callback_metrics["val/max_vio"], expected)
    assert "train/max_vio" in t.callback_metrics and "train/dead_experts" in t.callback_metrics
    png = (tmp_path / "expert_load_step2.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_heatmap_png_is_decodable(tmp_path):
    load = torch.tensor([[10.0, 0.0, 5.0, 5.0]])
    image = load_heatmap(load, cell=3)
    assert image.shape == (3, 12, 3)
    assert image[0, 3].tolist() == [0, 0, 0]  # no token: black
    assert image[0, 6].tolist() == [255, 255, 255]  # average load: white
    write_png(tmp_path / "h.png", image)
    data = (tmp_path / "h.png").read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    assert (width, height) == (12, 3) and len(zlib.decompress(idat)) == 3 * (1 + 12 * 3)


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AuxLossFreeBalancing(-1e-3), r"update_rate \(-0.001\) must be >= 0"),
        (lambda: SequenceBalanceLoss(-1.0), r"SequenceBalanceLoss\]\.alpha \(-1.0\) must be >= 0"),
        (lambda: AuxBalanceLoss(float("nan")), r"alpha \(nan\) must be >= 0"),
        (lambda: ExpertLoadMonitor(window=0), r"window \(0\) must be >= 1"),
    ],
)
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("callback", [AuxLossFreeBalancing, SequenceBalanceLoss, ExpertLoadMonitor])
def test_model_without_moe_layer_is_rejected(callback):
    module = make_module(first_k_dense_replace=3)
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        trainer(max_steps=1, callbacks=[callback()]).fit(module, DataLoader(batches(1), batch_size=None))
