"""Fine-tuning batches (a loss mask and packed conversations) on several processes log and train as one
process on the same global batch, although each process holds another number of target tokens.

The masked loss is normalised by the global batch's target count (dsv3_lightning/batch.py): a
per-process mean would weigh a process's few targets as much as another's many, and this test fails
then (the windows of rank 0 hold ~4x the targets of rank 1's). Under DualPipeStrategy every one of
the M micro-batches keeps the global count too (``Batch.split``: its loss is its masked sum × M × R /
global count): the cases mirror tests/distributed/test_composition.py's pipelines (every schedule on
PP2, torch's runtime for 1f1b, zb and dualpipev, ours for dualpipe and for dualpipev with expert
parallelism and ZeRO-1, whose (F;B) pairs are overlapped), and validation (val/loss, val/accuracy
weighted by the target mask, and the MTP head's val logs) is compared too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "dualpipe"))
from dualpipe_tiny import (  # noqa: E402
    SEQ, ReplicaSampler, make_module, make_tokens, make_trainer, metrics, strategy_cases,
)
from dsv3_lightning.plugins.load_balancing import AuxLossFreeBalancing, SequenceBalanceLoss  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

GLOBAL_BATCH = 8
KEYS = ["train/loss", "train/ce", "train/mtp_loss", "train/target_tokens", "train/masked_tokens", "val/loss",
        "val/accuracy", "val/mtp_loss"]


def conversation_windows(n: int) -> list[dict[str, torch.Tensor]]:
    """Windows of SEQ + 2 tokens holding two or three packed conversations and padding; even windows
    (rank 0's under two replicas) have most tokens as targets, odd ones few."""
    tokens = make_tokens(n, seed=7)
    g = torch.Generator().manual_seed(8)
    windows = []
    for i in range(n):
        cuts = sorted(torch.randperm(SEQ - 1, generator=g)[:2].add(1).tolist())
        documents = torch.full((SEQ + 2,), -1)
        for d, (start, end) in enumerate(zip([0, *cuts], [*cuts, SEQ + 1])):
            documents[start:end] = d
        dense = 0.9 if i % 2 == 0 else 0.2
        loss_mask = (torch.rand(SEQ + 2, generator=g) < dense) & (documents >= 0)
        windows.append({"tokens": tokens[i], "loss_mask": loss_mask, "documents": documents})
    return windows


WINDOWS = conversation_windows(3 * GLOBAL_BATCH)
VALIDATION = conversation_windows(4 * GLOBAL_BATCH)[-GLOBAL_BATCH:]  # one global batch, after step 3
CASES = strategy_cases()


def fit(root, case: str | None):
    processes, replicas, make_strategy = CASES[case] if case else (1, 1, lambda: None)
    strategy = make_strategy()
    callbacks = [AuxLossFreeBalancing(1e-2), SequenceBalanceLoss(1e-2)]
    trainer = make_trainer(root, processes, strategy, max_steps=3, callbacks=callbacks)
    loader, validation = (
        DataLoader(data, batch_size=GLOBAL_BATCH // replicas, sampler=ReplicaSampler(len(data), strategy))
        for data in (WINDOWS, VALIDATION)
    )
    trainer.fit(make_module(), loader, validation, weights_only=False)
    return metrics(root)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("single"), None)


def test_the_windows_give_the_processes_unequal_target_counts():
    even = sum(int(w["loss_mask"].sum()) for w in WINDOWS[0::2])
    odd = sum(int(w["loss_mask"].sum()) for w in WINDOWS[1::2])
    assert even > 3 * odd


@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_losses_on_many_processes_are_the_global_batch_means(case, single, tmp_path):
    got = fit(tmp_path, case)
    worst = 0.0
    for key in KEYS:
        assert got[key].keys() == single[key].keys() == ({2} if key.startswith("val/") else {0, 1, 2}), key
        for step, want in single[key].items():
            worst = max(worst, abs(got[key][step] - want) / max(abs(want), 1e-12))
            assert worst < 1e-5, (case, key, step, got[key], single[key])
    print(f"{case}: every logged value within {worst:.1e} of one process over 3 steps")

