"""Launching ``dsv3 fit`` as a cluster does: under ``torchrun``, and the multi-node 671B example config.

Under torchrun (TORCHELASTIC_RUN_ID, RANK, LOCAL_RANK, WORLD_SIZE set by the launcher) Lightning picks
``TorchElasticEnvironment``, whose ``creates_processes_externally`` is True, so DDPStrategy's
``_configure_launcher`` sets no launcher and our ``_ShareLauncher`` is never built: each torchrun
process is one rank and joins the process group itself. The test below checks that
ParallelStrategy (through ExpertParallelStrategy) runs that way, with both ranks taking part, and logs
bit for bit what the run Lightning launches itself (``start_method: popen``) logs.

The second part checks configs/cluster/v3_671b.yaml: it parses with the real CLI (nothing built),
its mesh multiplies out to the cluster it names, and its model is configs/671B.yaml's.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.module import DSV3LightningModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from test_cli import ROOT, write_config  # noqa: E402  (tiny.yaml's callbacks on test_cli's small model)
from test_configs import ParseOnly  # noqa: E402  (parses without building the model)

DSV3 = str(Path(sys.executable).parent / "dsv3")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CLUSTER = ROOT / "configs/cluster/v3_671b.yaml"

# tiny.yaml's callbacks and EP2 on test_cli's small model (2 layers, 8 experts: 4 per rank), 4 steps
FIT = [
    "fit",
    "--config", str(ROOT / "configs/tiny.yaml"),
    "--config", str(ROOT / "configs/ablations/expert_parallel/ep2.yaml"),
]  # fmt: skip
EP = ["--trainer.strategy.timeout", "120"]


def _fit(command: list[str], cwd: Path) -> str:
    """Runs ``command`` in its own session (a hang is ended with every rank under it); returns the log."""
    # TORCH_DISTRIBUTED_DEBUG=DETAIL: a collective that the two ranks call differently fails at once
    env = {**os.environ, "TORCH_DISTRIBUTED_DEBUG": "DETAIL", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)  # a test session launched by torchrun must not leak its own rank
    log = cwd / "fit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{command[:6]}: no exit within 300 s (a hang); the log ends:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode == 0, f"{command[:6]} exited {proc.returncode}:\n{text[-4000:]}"
    return text


def _logged(run: Path, key: str) -> dict[int, str]:
    """``key`` by step, as the CSV holds it (strings: compared bit for bit)."""
    (version,) = (run / "run").iterdir()
    with open(version / "metrics.csv") as f:
        return {int(r["step"]): r[key] for r in csv.DictReader(f) if r.get(key)}


def test_torchrun_expert_parallel_fit_equals_lightning_launch(tmp_path, corpus):
    # Lightning's own launch first: it builds the tokenizer and token cache both runs share (tmp_path/cache)
    launched = tmp_path / "launched"
    write_config(launched, corpus, max_steps=4)
    _fit([DSV3, *FIT, "--config", str(launched / "override_4.yaml"), *EP], launched)

    elastic = tmp_path / "torchrun"
    write_config(elastic, corpus, max_steps=4)
    log = _fit([*TORCHRUN, DSV3, *FIT, "--config", str(elastic / "override_4.yaml"), *EP], elastic)

    # torchrun made the two ranks and Lightning spawned none of its own (that would be 4 members)
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in log, log[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    assert "MEMBER: 3/" not in log
    assert "1 pipeline x 1 data x 2 expert ranks" in log
    (version,) = (elastic / "run").iterdir()
    last = version / "checkpoints" / "last.ckpt"
    assert last.is_dir(), sorted(p.name for p in (version / "checkpoints").iterdir())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "objects.pt"} <= {p.name for p in last.iterdir()}

    for key in ("train/loss", "val/loss"):
        ours, theirs = _logged(elastic, key), _logged(launched, key)
        assert sorted(ours) == sorted(theirs) and ours, (key, ours, theirs)
        assert ours == theirs, key  # bitwise: the same ranks, data and collectives, another launcher


# ----------------------------------------------------------------------------- the 671B cluster config
def test_cluster_config_parses_and_its_mesh_is_the_cluster(monkeypatch):
    monkeypatch.setattr("sys.argv", ["dsv3"])
    from dsv3_lightning.plugins.dualpipe.plans import validate

    cli = ParseOnly(DSV3LightningModule, DSV3DataModule, args=["--config", str(CLUSTER)], run=False)  # nothing built
    trainer, strategy = cli.config.trainer, cli.config.trainer.strategy
    assert strategy.class_path == "dsv3_lightning.plugins.dualpipe.DualPipeStrategy"
    args = strategy.init_args
    world = trainer.devices * trainer.num_nodes
    assert (trainer.devices, trainer.num_nodes, world) == (8, 256, 2048)
    pp, ep = args.pipeline_parallel_size, args.expert_parallel_size
    assert (pp, ep, world // (pp * ep)) == (16, 64, 2) and world % (pp * ep) == 0
    validate(args.schedule, pp, args.num_microbatches)  # the schedule takes this micro-batch count
    assert cli.config.data.batch_size % args.num_microbatches == 0
    assert cli.config.data.batch_size * ep * (world // (pp * ep)) == 15360  # V3's global batch, in sequences
    assert args.zero1 and args.fp8_dispatch and args.ranks_per_node == trainer.devices
    # node-limited routing: an expert group is 64 consecutive ranks = 8 nodes = the router's 8 groups
    model = cli.config.model.config
    assert ep // args.ranks_per_node == model.n_group and args.max_nodes_per_token == model.topk_group
    assert model.n_routed_experts % ep == 0
    assert [p.class_path for p in trainer.plugins] == ["dsv3_lightning.plugins.fp8.FP8Precision"]
    callbacks = {c.class_path.rsplit(".", 1)[-1] for c in trainer.callbacks}
    assert {"AuxLossFreeBalancing", "SequenceBalanceLoss"} <= callbacks
    (head,) = cli.config.model.heads
    assert head.class_path == "dsv3_lightning.plugins.mtp.MultiTokenPrediction"
    assert cli.config.data.extra_tokens == head.init_args.depth

    # the model block is configs/671B.yaml's, so that the two cannot drift apart
    preset = yaml.safe_load((ROOT / "configs/671B.yaml").read_text())["model"]["config"]
    ours = yaml.safe_load(CLUSTER.read_text())["model"]["config"]
    assert ours == preset
