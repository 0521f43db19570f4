"""Multi-process ``dsv3 fit`` runs of configs/tiny.yaml's callbacks through several validations and
checkpoints, under torch's collective checker.

``TORCH_DISTRIBUTED_DEBUG=DETAIL`` wraps every process group in torch's ``ProcessGroupWrapper``,
which, before each collective, compares the operation, shapes and dtypes every rank is about to run
and raises "Detected mismatch between collectives on ranks" naming both. A collective that one rank
calls and the others do not (rank 0 reading ``trainer.log_dir``, a broadcast, while rank 1 syncs a
torchmetrics state) is then an error within a second instead of a hang until the process-group
timeout; a collective that no other rank ever joins still ends in the subprocess timeout below.
Each run is a real ``dsv3 fit`` (Lightning relaunches the command for the other ranks).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DSV3 = str(Path(sys.executable).parent / "dsv3")

SHAPE = """
trainer:
  max_steps: 6
  val_check_interval: 2
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: run}}
model:
  config:
    hidden_size: 32
    intermediate_size: 64
    moe_intermediate_size: 16
    num_hidden_layers: 4
    num_attention_heads: 2
    q_lora_rank: 16
    kv_lora_rank: 16
    qk_nope_head_dim: 8
    qk_rope_head_dim: 4
    v_head_dim: 8
    n_routed_experts: 8
    num_experts_per_tok: 2
    n_group: 4
    topk_group: 2
    max_position_embeddings: 64
  warmup_steps: 2
data:
  data_path: {corpus}
  cache_dir: {cache}
  vocab_size: 300
  seq_len: 16
  batch_size: 4
"""

# (strategy config on top of tiny.yaml, extra options); each on 2 processes.
STRATEGIES = {
    "ddp": (None, ["--trainer.devices", "2", "--trainer.strategy", "ddp"]),
    "expert_parallel": ("configs/ablations/expert_parallel/ep2.yaml", ["--trainer.strategy.timeout", "120"]),
    # DualPipe's file keeps tiny.yaml's callbacks but SequenceBalanceLoss and ExpertLoadMonitor,
    # which it refuses (they need every stage's routers): issue 16.
    "dualpipev": ("configs/ablations/dualpipe/dualpipev_pp2.yaml", ["--trainer.strategy.timeout", "120"]),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_fit_validates_and_checkpoints_on_two_processes(tmp_path, corpus, strategy):
    config, extra = STRATEGIES[strategy]
    shape = tmp_path / "shape.yaml"
    shape.write_text(SHAPE.format(root=tmp_path, corpus=corpus, cache=tmp_path / "cache"))
    configs = ["--config", str(ROOT / "configs/tiny.yaml")]
    if config:
        configs += ["--config", str(ROOT / config)]
    command = [DSV3, "fit", *configs, "--config", str(shape), *extra]
    # torch 2.13's DDP segfaults in its construction logger under DETAIL: plain DDP runs unchecked
    # (a hang still fails by the timeout below); our strategies, which own their collectives, checked.
    debug = "OFF" if strategy == "ddp" else "DETAIL"
    env = {**os.environ, "TORCH_DISTRIBUTED_DEBUG": debug, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    log = tmp_path / "fit.log"
    with open(log, "w") as out:
        try:
            done = subprocess.run(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=300, start_new_session=True)
        except subprocess.TimeoutExpired:
            os.killpg(0, 0)  # the group is ours: start_new_session
            pytest.fail(f"{strategy}: no exit within 300 s (a hang); the log ends:\n{log.read_text()[-3000:]}")
    assert done.returncode == 0, f"{strategy} exited {done.returncode}:\n{log.read_text()[-4000:]}"
    (version,) = (tmp_path / "run").iterdir()
    rows = list(csv.DictReader(open(version / "metrics.csv")))
    val_steps = sorted(int(r["step"]) for r in rows if r.get("val/loss"))
    assert val_steps == [1, 3, 5], val_steps  # three validations, each logged once
    checkpoints = {p.name for p in (version / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and len(checkpoints) >= 2, checkpoints
    if strategy != "dualpipev":
        assert len(list(version.glob("expert_load_step*.png"))) == 3  # ExpertLoadMonitor's heat maps
