"""The depth-decay MTP example: its weighting, and a run from plugins/examples/mtp_depth_decay.yaml."""

from __future__ import annotations

import csv

import pytest
import torch
from dsv3_lightning.plugins.examples.mtp_depth_decay import DepthDecayMTP
from dsv3_lightning.plugins.mtp import MultiTokenPrediction


def test_weights_decay_geometrically_and_one_is_v3():
    torch.testing.assert_close(DepthDecayMTP(depth=3, decay=0.5).depth_weights(), torch.tensor([4, 2, 1]) / 7)
    losses_D = torch.tensor([2.0, 3.0, 5.0])
    v3 = MultiTokenPrediction(depth=3, loss_weight=0.3).weighted_loss(losses_D, step=0)
    torch.testing.assert_close(DepthDecayMTP(depth=3, loss_weight=0.3, decay=1.0).weighted_loss(losses_D, 0), v3)
    only_first = DepthDecayMTP(depth=3, loss_weight=0.3, decay=0.0).weighted_loss(losses_D, 0)
    torch.testing.assert_close(only_first, torch.tensor(0.3 * 2.0))


def test_lambda_schedule_is_inherited():
    head = DepthDecayMTP(depth=2, loss_weight=0.3, decay=0.5, later_loss_weight=0.1, switch_at_step=10)
    losses_D = torch.tensor([3.0, 6.0])
    torch.testing.assert_close(head.weighted_loss(losses_D, 9), torch.tensor(0.3 * 4.0))
    torch.testing.assert_close(head.weighted_loss(losses_D, 10), torch.tensor(0.1 * 4.0))


def test_decay_out_of_range():
    with pytest.raises(ValueError, match=r"model.heads\[DepthDecayMTP\].decay \(1.5\) must be in \[0, 1\]"):
        DepthDecayMTP(decay=1.5)


def test_runs_from_yaml_and_the_training_loss_uses_the_decayed_weights(fit_example):
    cli = fit_example("mtp_depth_decay.yaml", 6)
    [head] = cli.model.heads
    assert type(head) is DepthDecayMTP and head.depth == 2 and head.decay == 0.5
    with open(f"{cli.trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 6
    told_apart = 0
    for r in rows:
        value = {k: float(v) for k, v in r.items() if v}
        mtp = value["train/loss"] - value["train/ce"] - value["train/seq_balance_loss"]  # tiny.yaml's balance loss
        d1, d2 = value["train/mtp_loss/depth_1"], value["train/mtp_loss/depth_2"]
        assert mtp == pytest.approx(0.3 * (2 / 3 * d1 + 1 / 3 * d2), abs=2e-6)
        # V3's equal weights differ from these by 0.3 * (d1 - d2) / 6: where the depths' losses have parted
        # (not at the first steps from the initialisation, where both are about ln V), they fail
        if abs(d1 - d2) > 1e-3:
            assert abs(mtp - 0.3 * (d1 + d2) / 2) > 2e-5
            told_apart += 1
    assert told_apart, [(r["train/mtp_loss/depth_1"], r["train/mtp_loss/depth_2"]) for r in rows]
