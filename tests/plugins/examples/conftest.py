"""Runs a plugin example from its YAML file on a very small model, in this process, with `dsv3 fit`'s CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dsv3_lightning.cli import DSV3CLI
from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.module import DSV3LightningModule

ROOT = Path(__file__).resolve().parents[3]
SMALL = """
trainer:
  max_steps: {max_steps}
  val_check_interval: {max_steps}
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
    moe_intermediate_size: 32
    num_hidden_layers: 3
    num_attention_heads: 2
    q_lora_rank: 32
    kv_lora_rank: 32
    qk_nope_head_dim: 16
    qk_rope_head_dim: 16
    v_head_dim: 16
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
  seq_len: 32
  batch_size: 4
"""


@pytest.fixture(autouse=True)
def _plain_argv(plain_argv):
    """Every test here calls the CLI."""


@pytest.fixture
def fit_example(tmp_path, corpus) -> Callable[..., DSV3CLI]:
    """``fit_example("proportional_bias.yaml", max_steps)``: tiny.yaml + the example's YAML + a small model.

    Returns the LightningCLI after ``fit``: ``cli.trainer``, ``cli.model`` and the run's metrics.csv
    under ``tmp_path/run/version_0``.
    """

    def fit(example: str, max_steps: int, *extra: str) -> DSV3CLI:
        small = tmp_path / "small.yaml"
        small.write_text(SMALL.format(max_steps=max_steps, root=tmp_path, corpus=corpus, cache=corpus.parent / "cache"))
        args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / "plugins/examples" / example),
                "--config", str(small), *extra]
        return DSV3CLI(DSV3LightningModule, DSV3DataModule, args=args, save_config_kwargs={"overwrite": True},
                       parser_kwargs={"default_env": False})

    return fit
