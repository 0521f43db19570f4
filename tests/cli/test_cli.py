"""`dsv3` end to end on a small corpus: fit, logs, checkpoints, exact resume, validate, bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from dsv3_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = """
trainer:
  max_steps: {max_steps}
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
    num_hidden_layers: 2
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
  batch_size: 2
"""


class CrashAt(L.Callback):
    """Kills training (an exception, as a crash would) once ``step`` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


@pytest.fixture(autouse=True)
def _plain_argv(plain_argv):
    """Every test here calls the CLI."""


def write_config(path: Path, corpus: Path, max_steps: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = path / f"override_{max_steps}.yaml"
    config.write_text(OVERRIDES.format(max_steps=max_steps, root=path, corpus=corpus, cache=path.parent / "cache"))
    return config


def fit(tmp_path: Path, corpus: Path, max_steps: int, *extra: str) -> list[dict[str, str]]:
    config = write_config(tmp_path, corpus, max_steps)
    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(config), *extra])
    versions = sorted((tmp_path / "run").iterdir())
    with open(versions[-1] / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_fit_logs_checkpoints_and_resumes_exactly(tmp_path, corpus):
    straight = tmp_path / "straight"
    rows = fit(straight, corpus, 6)
    losses = column(rows, "train/loss")
    assert sorted(losses) == [0, 1, 2, 3, 4, 5]
    assert {"val/loss", "val/ppl", "val/accuracy", "params/total", "params/activated"} <= set(rows[0])
    val = column(rows, "val/loss")
    ppl = column(rows, "val/ppl")
    assert len(val) == 3 and all(ppl[s] == pytest.approx(torch.tensor(val[s]).exp().item(), rel=1e-5) for s in val)
    assert (straight / "run" / "version_0" / "checkpoints" / "last.ckpt").is_file()

    # The same run crashes after step 5; the last checkpoint (step 4) resumes it to the same result.
    interrupted = tmp_path / "interrupted"
    crash = '--trainer.callbacks+={"class_path": "test_cli.CrashAt", "init_args": {"step": 5}}'
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(interrupted, corpus, 6, crash)
    last = interrupted / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    resumed = column(fit(interrupted, corpus, 6, "--ckpt_path", str(last)), "train/loss")
    assert sorted(resumed) == [4, 5]
    for step in (4, 5):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-6), step
    a = torch.load(straight / "run" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(interrupted / "run" / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    # tiny.yaml balances with the selection bias: the resumed run carried it on, not from zero.
    biases = [t for n, t in b["state_dict"].items() if n.endswith("e_score_correction_bias")]
    assert biases and all(t.abs().sum() > 0 for t in biases)
    assert "train/seq_balance_loss" in rows[0] and "train/max_vio" in rows[0]


def test_validate_from_checkpoint(tmp_path, corpus):
    fit(tmp_path, corpus, 2)
    last = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    config = write_config(tmp_path, corpus, 2)
    main(["validate", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(config), "--ckpt_path", str(last)])
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_1" / "metrics.csv")))
    assert any(r.get("val/loss") for r in rows)


def test_seq_len_above_max_positions(tmp_path, corpus):
    config = write_config(tmp_path, corpus, 1)
    with pytest.raises(ValueError, match=r"data.seq_len \(128\) exceeds model.config.max_position_embeddings \(64\)"):
        main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(config), "--data.seq_len", "128"])


def test_unknown_model_key_is_named(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus, 1)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(config),
              "--model.config.n_experts", "4"])
    assert "n_experts" in capsys.readouterr().err


def test_missing_data_path(tmp_path, corpus):
    config = write_config(tmp_path, corpus, 1)
    with pytest.raises(FileNotFoundError, match=r"data.data_path"):
        main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(config),
              "--data.data_path", str(tmp_path / "missing")])
