"""Portable checkpoints: a run saved with 2 expert ranks resumes with 1 or 4 (and a 1-process run
resumes with 2) exactly where an uninterrupted single process would be; the checkpoint is a sharded
directory (each rank wrote its share) that reads as the full model and exports to the Hugging Face
layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ep_tiny import GLOBAL_BATCH, fit, make_module, make_tokens, relative_errors
from lightning.pytorch.callbacks import ModelCheckpoint

from dsv3_lightning.model import DeepSeekV3
from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.sharded_checkpoint import is_sharded_checkpoint
from dsv3_lightning.sharded_checkpoint_io import read_lightning_checkpoint

WINDOWS = make_tokens(2 * GLOBAL_BATCH)  # 2 steps per epoch: a checkpoint at step 2 ends epoch 0


def save_after_two_steps(root: Path, devices: int) -> Path:
    fit(root, devices, devices, max_steps=2, windows=WINDOWS, callbacks=[ModelCheckpoint(root / "ckpt", save_top_k=-1)])
    [path] = (root / "ckpt").glob("*.ckpt")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("single"), 1, 1, max_steps=3, windows=WINDOWS)[0].state_dict()


@pytest.fixture(scope="module")
def saved_by_two(tmp_path_factory):
    return save_after_two_steps(tmp_path_factory.mktemp("ep2"), 2)


def assert_same_model(got: dict, want: dict) -> None:
    errors = relative_errors(got, want)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])


def test_checkpoint_holds_the_full_model_and_optimizer_state(saved_by_two):
    assert is_sharded_checkpoint(saved_by_two) and len(list(saved_by_two.glob("*.distcp"))) == 2
    ckpt = read_lightning_checkpoint(saved_by_two)
    plain = make_module().state_dict()
    assert {k: v.shape for k, v in ckpt["state_dict"].items()} == {k: v.shape for k, v in plain.items()}
    [opt] = ckpt["optimizer_states"]
    shapes = {tuple(s["exp_avg"].shape) for s in opt["state"].values()}
    assert (8, 32, 32) in shapes and (8, 32, 16) in shapes  # full experts' AdamW moments


@pytest.mark.parametrize("devices", [1, 4])
def test_saved_with_two_expert_ranks_resumes_with_one_or_four(saved_by_two, uninterrupted, tmp_path, devices):
    module, _, _ = fit(tmp_path, devices, devices, max_steps=3, windows=WINDOWS, ckpt_path=str(saved_by_two))
    assert_same_model(module.state_dict(), uninterrupted)


def test_saved_by_one_process_resumes_with_two_expert_ranks(uninterrupted, tmp_path):
    path = save_after_two_steps(tmp_path / "one", 1)
    module, _, _ = fit(tmp_path / "two", 2, 2, max_steps=3, windows=WINDOWS, ckpt_path=str(path))
    assert_same_model(module.state_dict(), uninterrupted)


def test_expert_parallel_checkpoint_exports_to_hugging_face(saved_by_two, tmp_path):
    ckpt = read_lightning_checkpoint(saved_by_two)
    module = DSV3LightningModule.from_hparams(ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    module.model.save_pretrained(tmp_path / "hf")
    reloaded = DeepSeekV3.from_pretrained(tmp_path / "hf")
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
