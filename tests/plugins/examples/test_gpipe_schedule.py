"""The GPipe example: its action lists in the simulator, and 2 pipeline processes built from its YAML
training like one process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from dsv3_lightning.plugins.dualpipe import DualPipeStrategy
from dsv3_lightning.plugins.dualpipe.simulator import ChunkCosts, simulate
from dsv3_lightning.plugins.examples.gpipe_schedule import GPipeStrategy

# the DualPipe tests' 2-process Lightning run
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dualpipe"))
from test_strategy import fit

EXAMPLE = Path(__file__).resolve().parents[3] / "plugins/examples/gpipe_schedule.yaml"


def test_simulated_bubble_equals_1f1b_with_all_microbatches_held():
    costs = ChunkCosts(F=1.0, B=2.0, W=1.0, FB=2.5)
    for pp, m in ((4, 20), (8, 20)):
        gpipe = simulate(GPipeStrategy(pp, m).build_plan(), costs)
        one_f_one_b = simulate(DualPipeStrategy(pp, m, "1f1b").build_plan(), costs)
        assert gpipe.bubble == pytest.approx((pp - 1) * (1.0 + 2.0)) == one_f_one_b.bubble
        assert gpipe.peak_activations == m and one_f_one_b.peak_activations == pp


def test_two_processes_from_the_yaml_train_like_one(tmp_path):
    spec = yaml.safe_load(EXAMPLE.read_text())["trainer"]["strategy"]
    assert spec["class_path"].endswith("GPipeStrategy")
    strategy = GPipeStrategy(**spec["init_args"], start_method="fork")
    _, want = fit(tmp_path / "one", None)
    _, got = fit(tmp_path / "gpipe", strategy)
    for key in ("train/loss", "val/loss"):
        assert got[key].keys() == want[key].keys()
        for step in want[key]:
            assert got[key][step] == pytest.approx(want[key][step], rel=1e-5), (key, step)
