"""Every plugin under every strategy, all at once, against one process on the same global batches.

Each case trains the tiny MoE model 3 steps with the plugins that compose exactly switched on together:
the bias update (AuxLossFreeBalancing), the sequence-wise loss (alpha 1e-2, so that its gradient shows),
ExpertLoadMonitor, MTP depth 1, recomputation and AdamW with bfloat16 moments (AdamWBF16), under
ExpertParallelStrategy (EP2; EP2 x DP2 with ZeRO-1) and DualPipeStrategy (each schedule on PP2;
dualpipev on PP2 x EP2 with ZeRO-1), and checks every logged training value against one process
running the same plugins on the same global batch (1e-5 relative). The plugins whose numbers
depend on how the batch is cut are checked elsewhere, with the reason: FP8 GEMMs
(tests/plugins/dualpipe/test_v3_recipe.py: blockwise Wgrad tiles tokens 128 at a time) and the classic
batch-level AuxBalanceLoss (its f and P are per micro-batch and per rank, as in Megatron; here it only
has to run and log the same keys). The README's composition table is this file's cases.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "dualpipe"))
from dualpipe_tiny import ReplicaSampler, make_module, make_tokens, make_trainer, metrics, strategy_cases  # noqa: E402
from dsv3_lightning.plugins.fp8 import AdamWBF16  # noqa: E402
from dsv3_lightning.plugins.load_balancing import (  # noqa: E402
    AuxBalanceLoss,
    AuxLossFreeBalancing,
    ExpertLoadMonitor,
    SequenceBalanceLoss,
)
from torch.utils.data import DataLoader  # noqa: E402

GLOBAL_BATCH = 16
WINDOWS = make_tokens(2 * GLOBAL_BATCH, seed=5)
KEYS = ["train/loss", "train/ce", "train/mtp_loss", "train/seq_balance_loss", "train/max_vio",
        "train/bias_abs_mean"]

# every mesh of dualpipe_tiny.strategy_cases but plain dualpipev (its torch runtime is 1f1b's and zb's)
CASES = {name: case for name, case in strategy_cases().items() if name != "PP2-dualpipev"}


def _module():
    module = make_module(recompute=True)

    def configure_optimizers():
        return AdamWBF16(module.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    module.configure_optimizers = configure_optimizers
    return module


def fit(root, case: str | None, *, callbacks=None):
    processes, replicas, make_strategy = CASES[case] if case else (1, 1, lambda: None)
    strategy = make_strategy()
    callbacks = callbacks or [AuxLossFreeBalancing(1e-2), SequenceBalanceLoss(1e-2), ExpertLoadMonitor(heatmap=False)]
    trainer = make_trainer(root, processes, strategy, max_steps=3, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(
        _module(),
        DataLoader(list(WINDOWS), batch_size=GLOBAL_BATCH // replicas, sampler=ReplicaSampler(len(WINDOWS), strategy)),
        weights_only=False,
    )
    return metrics(root)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("single"), None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_all_exact_plugins_at_once_log_what_one_process_logs(case, single, tmp_path):
    got = fit(tmp_path, case)
    worst = 0.0
    for key in KEYS:
        assert got[key].keys() == single[key].keys() == {0, 1, 2}, key
        for step, want in single[key].items():
            worst = max(worst, abs(got[key][step] - want) / max(abs(want), 1e-12))
            assert worst < 1e-5, (case, key, step, got[key], single[key])
    print(f"{case}: every logged value within {worst:.1e} of one process over 3 steps")


@pytest.mark.parametrize("case", ["EP2", "PP2-dualpipe"])
def test_batch_level_aux_loss_runs_and_logs_under_every_strategy(case, tmp_path):
    """Its statistics are per micro-batch and per rank: not one process's number, so only finite and logged."""
    got = fit(tmp_path, case, callbacks=[AuxBalanceLoss(1e-3)])
    values = got["train/aux_balance_loss"]
    assert sorted(values) == [0, 1, 2] and all(torch.isfinite(torch.tensor(v)) and v > 0 for v in values.values())
