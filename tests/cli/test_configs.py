"""Every fit config in configs/ parses with the real `dsv3` parser and gives a valid ModelConfig.

Sweep files (configs/sweeps/) are not fit configs; the sweep tests check them."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv3_lightning import ModelConfig
from dsv3_lightning.cli import DSV3CLI
from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.module import DSV3LightningModule

ROOT = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if "sweeps" not in p.relative_to(ROOT).parts)


class ParseOnly(DSV3CLI):
    """Parses and checks (before_instantiate_classes) without building a 671B model."""

    def instantiate_classes(self) -> None:
        pass


def test_there_are_configs():
    assert {"tiny.yaml", "small.yaml", "16B.yaml", "671B.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(path, monkeypatch):
    """Files under configs/ablations/ are overrides: they are parsed on top of tiny.yaml, as documented."""
    monkeypatch.setattr("sys.argv", ["dsv3"])
    base = ["--config", str(ROOT / "tiny.yaml")] if "ablations" in path.parts else []
    cli = ParseOnly(DSV3LightningModule, DSV3DataModule, args=[*base, "--config", str(path)], run=False)
    model = cli.config.model
    config = ModelConfig(**model.config.as_dict())  # runs the same validation as training would
    assert config.vocab_size == cli.config.data.vocab_size  # linked
