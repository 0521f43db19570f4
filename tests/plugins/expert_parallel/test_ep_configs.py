"""The expert-parallel YAML files parse with the real `dsv3` parser on top of tiny.yaml and build
the strategy they describe, whose checks accept the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from dsv3_lightning.plugins.expert_parallel import ExpertParallelStrategy
from dsv3_lightning.plugins.expert_parallel.node_limited import apply_node_limit, node_groups
from dsv3_lightning.plugins.expert_parallel.strategy import check_model
from jsonargparse import Namespace

from dsv3_lightning import ModelConfig
from dsv3_lightning.cli import DSV3CLI
from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.model import DeepSeekV3
from dsv3_lightning.module import DSV3LightningModule

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
FILES = sorted((CONFIGS / "ablations/expert_parallel").glob("*.yaml"))


class ParseOnly(DSV3CLI):
    def instantiate_classes(self) -> None:
        pass


def test_there_are_expert_parallel_configs():
    assert {"ep2.yaml", "ep4_node_limited.yaml"} <= {f.name for f in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_config_parses_and_builds_the_strategy(path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["dsv3"])
    args = ["--config", str(CONFIGS / "tiny.yaml"), "--config", str(path)]
    cli = ParseOnly(DSV3LightningModule, DSV3DataModule, args=args, run=False)
    spec = cli.config.trainer.strategy
    assert spec.class_path == "dsv3_lightning.plugins.expert_parallel.ExpertParallelStrategy"
    init = spec.init_args.as_dict() if isinstance(spec.init_args, Namespace) else dict(spec.init_args)
    strategy = ExpertParallelStrategy(**init)
    assert cli.config.trainer.devices % strategy.expert_parallel_size == 0
    model = DeepSeekV3(ModelConfig(**{**cli.config.model.config.as_dict(), "vocab_size": 64}))
    check_model(model, strategy.expert_parallel_size)
    if strategy.max_nodes_per_token is not None:  # the tiny model's groups must already be the nodes
        before = [(r.n_group, r.topk_group) for r in model.routers()]
        nodes = node_groups(strategy.expert_parallel_size, strategy.ranks_per_node or cli.config.trainer.devices)
        apply_node_limit(model.routers(), strategy.max_nodes_per_token, nodes)
        assert [(r.n_group, r.topk_group) for r in model.routers()] == before == [(nodes, 2)] * 3
