"""`dsv3 fit` with configs/ablations/expert_parallel/ep2.yaml trains 2 steps on 2 processes (the
"popen" launcher, as users run it) and saves a sharded checkpoint that the default strategy of `dsv3
validate` reads (~30 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dsv3_lightning.sharded_checkpoint import is_sharded_checkpoint
from dsv3_lightning.sharded_checkpoint_io import tensor_entries

ROOT = Path(__file__).resolve().parents[3]


def test_dsv3_fit_with_ep2_yaml(tmp_path):
    dsv3 = Path(sys.executable).parent / "dsv3"
    command = [
        str(dsv3), "fit",
        "--config", str(ROOT / "configs/tiny.yaml"),
        "--config", str(ROOT / "configs/ablations/expert_parallel/ep2.yaml"),
        "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "expert_parallel: 1 pipeline x 1 data x 2 expert ranks; 3 MoE layer(s), 8 of 16 experts per rank" in log
    [last] = tmp_path.rglob("last.ckpt")
    assert is_sharded_checkpoint(last) and len(list(last.glob("*.distcp"))) == 2  # each rank wrote its share
    sizes = tensor_entries(last)
    assert sizes["state_dict.model.model.layers.1.mlp.experts.gate_up_proj"].size == (16, 256, 256)  # all experts
    validate = [str(dsv3), "validate", "--config", str(ROOT / "configs/tiny.yaml"), "--ckpt_path", str(last),
                "--trainer.default_root_dir", str(tmp_path / "v"), "--trainer.logger", "false",
                "--trainer.limit_val_batches", "2"]  # fmt: skip
    done = subprocess.run(validate, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "val/loss" in done.stdout + done.stderr
