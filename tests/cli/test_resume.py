"""Exact resume, plugin by plugin: a ``dsv3 fit`` that crashes after a checkpoint and is resumed with
``--ckpt_path`` logs what the uninterrupted run logs, for 20 steps after the resume and through four
validations, within 1e-5 relative per logged value (it is bitwise today: the largest difference is
reported on failure). Wall-clock metrics (ThroughputMonitor's timings) are left out; its counts are compared.

The runs are tiny.yaml's callbacks and schedule at test_cli's small shape, with one shipped ablation
file (or option) on top; ``benchmarks/resume_exact.py`` does the same at tiny.yaml's own shape with a
real ``kill -9``, and prints the README's table.
"""

from __future__ import annotations

from pathlib import Path

import csv

import pytest
import torch
from test_cli import ROOT, write_config

from dsv3_lightning.cli import main

STEPS, CRASH = 26, 6  # checkpoints at every validation (every 5 steps): the crash resumes from step 5
COMBINATIONS = {
    "tiny.yaml: bias update + sequence-wise loss + load monitor": [],
    "no balancing": ["configs/ablations/balancing/none.yaml"],
    "bias update alone": ["configs/ablations/balancing/bias.yaml"],
    "classic auxiliary loss": ["configs/ablations/balancing/aux_loss.yaml"],
    "MTP depth 1": ["configs/ablations/mtp/d1.yaml"],
    "MTP depth 2": ["configs/ablations/mtp/d2.yaml"],
    "FP8 blockwise + AdamWBF16": ["configs/ablations/fp8/blockwise.yaml"],
    "no group limit": ["configs/ablations/routing/unlimited.yaml"],
    "recomputation": ["--model.recompute_activations", "true"],
    "non-finite steps skipped": ["--model.nonfinite.action", "skip"],
}


@pytest.fixture(autouse=True)
def _plain_argv(plain_argv):
    """Every test here calls the CLI."""


def fit(root: Path, corpus: Path, ablation: list[str], *options: str) -> list[dict[str, str]]:
    """``dsv3 fit`` of tiny.yaml, then the ablation's files and options, then the small test shape
    (last, so that its logger and directories win over the ablation file's)."""
    files = [a for a in ablation if a.startswith("configs/")]
    flags = [a for a in ablation if not a.startswith("configs/")]
    configs = [x for f in files for x in ("--config", str(ROOT / f))]
    override = write_config(root, corpus, STEPS)
    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), *configs, "--config", str(override), *flags, *options])
    versions = sorted((root / "run").iterdir())
    with open(versions[-1] / "metrics.csv") as f:
        return list(csv.DictReader(f))


def logged(rows: list[dict[str, str]]) -> dict[tuple[str, int], float]:
    return {
        (key, int(row["step"])): float(value)
        for row in rows
        for key, value in row.items()
        if value and key not in ("step", "epoch") and not _wall_clock(key)
    }


def _wall_clock(key: str) -> bool:
    """ThroughputMonitor's timings (``train/time``, ``.../samples_per_sec`` ...): not the run's numbers."""
    return key.endswith("/time") or key.endswith("_per_sec")


def relative_differences(resumed: dict, straight: dict) -> dict[tuple[str, int], float]:
    return {k: abs(v - straight[k]) / max(abs(straight[k]), 1e-12) for k, v in resumed.items()}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_a_resumed_run_continues_exactly(tmp_path, corpus, name):
    ablation = [*COMBINATIONS[name], "--trainer.val_check_interval", "5"]
    straight = logged(fit(tmp_path / "straight", corpus, ablation))
    crash = f'--trainer.callbacks+={{"class_path": "test_cli.CrashAt", "init_args": {{"step": {CRASH}}}}}'
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "crashed", corpus, ablation, crash)
    (last,) = (tmp_path / "crashed").glob("run/version_0/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=False)["global_step"] == 5
    resumed = logged(fit(tmp_path / "crashed", corpus, ablation, "--ckpt_path", str(last)))
    steps = sorted(step for key, step in resumed if key == "train/loss")
    assert steps[0] == 5 and steps[-1] == STEPS - 1  # 21 steps after the checkpoint
    assert sum(1 for key, _ in resumed if key == "val/loss") == 4
    assert set(resumed) <= set(straight), sorted(set(resumed) - set(straight))[:5]
    differences = relative_differences(resumed, straight)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 1e-5, (worst, resumed[worst], straight[worst])
