"""What the console shows: LogProgress lines without a terminal, TQDM's bar with one, the summary's
training FLOPs, and the Trainer's switches and callbacks still in charge (progress.py, summary.py)."""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from test_cli import ROOT, fit, write_config

from dsv3_lightning.cli import DSV3CLI
from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.progress import LogProgress
from dsv3_lightning.summary import TrainingFlopsSummary

SHOWN = ["--trainer.enable_progress_bar", "true", "--trainer.enable_model_summary", "true"]
STEP_LINE = re.compile(
    r"^INFO dsv3_lightning\.progress: step (\d+)/6 \((\d+)%\) \| loss \d+\.\d{3} \| lr \d\.\d\de-\d\d \| "
    r"[\d,]+ tok/s \| elapsed \d+s \| eta \d+s$"
)
VALIDATION_LINE = re.compile(
    r"^INFO dsv3_lightning\.progress: validation at step (\d+): val/loss [\d.]+ \| val/ppl [\d.]+ \| "
    r"val/accuracy [\d.e-]+ \| took \d+s$"
)


@pytest.fixture(autouse=True)
def _plain_argv(plain_argv):
    """Every test here calls the CLI."""


def test_without_a_terminal_a_line_every_n_steps_and_per_validation(tmp_path, corpus, capsys):
    assert not sys.stdout.isatty()  # pytest's capture
    fit(tmp_path, corpus, 6, *SHOWN, "--trainer.log_every_n_steps", "4")
    err = capsys.readouterr().err.splitlines()
    steps = [STEP_LINE.match(line) for line in err if "progress: step" in line]
    assert all(steps), err
    assert [(int(m[1]), int(m[2])) for m in steps] == [(4, 67), (6, 100)]  # every 4, and the last step
    validations = [VALIDATION_LINE.match(line) for line in err if "progress: validation" in line]
    assert all(validations), err
    assert [int(m[1]) for m in validations] == [2, 4, 6]  # val_check_interval: 2


def test_lines_count_the_tokens_of_every_batch(tmp_path, corpus, capsys, monkeypatch):
    clock = iter(range(1000))  # each of LogProgress's clock readings is one second after the last
    fake_time = SimpleNamespace(perf_counter=lambda: float(next(clock)))
    monkeypatch.setattr("dsv3_lightning.progress.time", fake_time)
    fit(tmp_path, corpus, 2, *SHOWN, "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "10")
    lines = [line for line in capsys.readouterr().err.splitlines() if "progress: step" in line]
    # 2 windows of 16 targets per batch; the window is the one second between two clock readings.
    assert [re.search(r"\| ([\d,]+ tok/s \| .*)$", line)[1] for line in lines] == [
        "32 tok/s | elapsed 1s | eta 1s",  # 1 s for the first of 2 steps: 1 s to go
        "32 tok/s | elapsed 3s | eta 0s",
    ]


def test_a_terminal_gets_tqdms_bar_without_a_negative_epoch_count(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    fit(tmp_path, corpus, 2, *SHOWN)
    out = capsys.readouterr()
    assert "Epoch 0:" in out.out and "Epoch 0/" not in out.out
    assert "progress: step" not in out.err


def test_the_summary_states_the_training_flops(tmp_path, corpus, capsys):
    fit(tmp_path, corpus, 1, *SHOWN)
    err = capsys.readouterr().err
    table = err[err.index("INFO dsv3_lightning.summary:"):]
    header = table.splitlines()[1]
    assert header.split("|")[1:] == [" Name         ", " Type       ", " Params ", " Mode "]
    # test_cli's shape: 2 layers (1 dense, 1 MoE of 8 experts, 2 active), 6 x activated parameters
    # without the embedding; a batch of 2 windows of 16 tokens per optimizer step.
    assert re.search(
        r"\n156 K     Training FLOPs per token, 4\.98 M per optimizer step of 32 tokens "
        r"\(6 x activated parameters without the embedding; attention scores not counted\)\n", table
    )
    assert "Total FLOPs" not in err and "Total Flops" not in err


def _callbacks(tmp_path, corpus, *extra: str) -> list:
    config = write_config(tmp_path, corpus, 1)
    args = ["--config", str(ROOT / "configs/tiny.yaml"), "--config", str(config), *extra]
    return DSV3CLI(DSV3LightningModule, DSV3DataModule, args=args, run=False).trainer.callbacks


def test_the_trainers_switches_and_callbacks_still_decide(tmp_path, corpus, monkeypatch):
    kinds = [type(c) for c in _callbacks(tmp_path, corpus, *SHOWN)]
    assert LogProgress in kinds and TrainingFlopsSummary in kinds
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert TQDMProgressBar in [type(c) for c in _callbacks(tmp_path, corpus, *SHOWN)]
    off = _callbacks(tmp_path, corpus)  # test_cli's config turns both off
    assert not any(isinstance(c, (TQDMProgressBar, LogProgress, ModelSummary)) for c in off)
    own = _callbacks(
        tmp_path, corpus, *SHOWN,
        "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",
        "--trainer.callbacks.refresh_rate=7",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelSummary",
    )
    bars = [c for c in own if isinstance(c, TQDMProgressBar)]
    assert len(bars) == 1 and bars[0].refresh_rate == 7
    assert [type(c) for c in own if isinstance(c, ModelSummary)] == [ModelSummary]


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match=r"^LogProgress\.every_n_steps \(0\) must be >= 1, or null for "
                                         r"trainer\.log_every_n_steps$"):
        LogProgress(every_n_steps=0)
