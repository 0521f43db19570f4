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
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from test_cli import ROOT, write_config  # noqa: E402  (tiny.yaml's callbacks on test_cli's small model)

DSV3 = str(Path(sys.executable).parent / "dsv3")

# test_cli's small model, with 4 layers (DualPipeV's 4 stages) and batches of 4 (its 4 micro-batches)
SMALL = ["--model.config.num_hidden_layers", "4", "--data.batch_size", "4"]

# (strategy config on top of tiny.yaml, extra options); each on 2 processes.
STRATEGIES = {
    "ddp": (None, ["--trainer.devices", "2", "--trainer.strategy", "ddp"]),
    "expert_parallel": ("configs/ablations/expert_parallel/ep2.yaml", ["--trainer.strategy.timeout", "120"]),
    # every strategy with all of tiny.yaml's callbacks (the sequence-wise loss, the load monitor ...)
    "dualpipev": ("configs/ablations/dualpipe/dualpipev_pp2.yaml", ["--trainer.strategy.timeout", "120"]),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_fit_validates_and_checkpoints_on_two_processes(tmp_path, corpus, strategy):
    config, extra = STRATEGIES[strategy]
    configs = ["--config", str(ROOT / "configs/tiny.yaml")]
    if config:
        configs += ["--config", str(ROOT / config)]
    small = write_config(tmp_path, corpus, max_steps=6)  # after the strategy's file: its logger wins
    command = [DSV3, "fit", *configs, "--config", str(small), *SMALL, *extra]
    # torch 2.13's DDP segfaults in its construction logger under DETAIL: plain DDP runs unchecked
    # (a hang still fails by the timeout below); our strategies, which own their collectives, checked.
    debug = "OFF" if strategy == "ddp" else "DETAIL"
    env = {**os.environ, "TORCH_DISTRIBUTED_DEBUG": debug, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    log = tmp_path / "fit.log"
    with open(log, "w") as out:
        # its own session, so that a hang is ended with every rank Lightning launched under it
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{strategy}: no exit within 300 s (a hang); the log ends:\n{log.read_text()[-3000:]}")
    done = proc
    assert done.returncode == 0, f"{strategy} exited {done.returncode}:\n{log.read_text()[-4000:]}"
    (version,) = (tmp_path / "run").iterdir()
    rows = list(csv.DictReader(open(version / "metrics.csv")))
    val_steps = sorted(int(r["step"]) for r in rows if r.get("val/loss"))
    assert val_steps == [1, 3, 5], val_steps  # three validations, each logged once
    checkpoints = {p.name for p in (version / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and len(checkpoints) >= 2, checkpoints
    assert len(list(version.glob("expert_load_step*.png"))) == 3  # ExpertLoadMonitor's heat maps
