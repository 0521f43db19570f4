"""DualPipeStrategy in Lightning: 2 pipeline processes train like 1 process, log, validate, and their
checkpoints are ordinary full checkpoints (saved with 2 stages, resumed with 1, and the reverse)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from dsv3_lightning.plugins.dualpipe import DualPipeStrategy
from dsv3_lightning.plugins.load_balancing import AuxLossFreeBalancing, ExpertLoadMonitor, SequenceBalanceLoss
from dualpipe_tiny import (
    assert_trained_alike,
    last,
    make_module,
    make_tokens,
    make_trainer,
    metrics,
    read_checkpoint,
)
from torch.utils.data import DataLoader

WINDOWS = make_tokens(16, seed=1)  # 2 batches of 8 per epoch


class ParamsHeld(L.Callback):
    """Logs the parameter elements this process holds while training (the CSV keeps rank 0's)."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        pl_module.log("params_held", float(sum(p.numel() for p in pl_module.parameters())))


def fit(root: Path, schedule: str | DualPipeStrategy | None, *, max_steps: int = 3, ckpt_path: str | None = None,
        callbacks=()):
    """Trains the tiny model (MoE + MTP) with 4 micro-batches on 2 pipeline ranks (a schedule's name, or a
    strategy), or on 1 process (None)."""
    if isinstance(schedule, str):
        strategy = DualPipeStrategy(2, 4, schedule, start_method="fork")
    else:
        strategy = schedule or "auto"
    module = make_module()
    make_trainer(root, 2 if schedule else 1, strategy, max_steps=max_steps, callbacks=callbacks).fit(
        module,
        DataLoader(list(WINDOWS), batch_size=8),
        DataLoader(list(WINDOWS[:8]), batch_size=8),
        ckpt_path=ckpt_path,
        weights_only=False,
    )  # hparams hold a ModelConfig
    return module, metrics(root)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return root, *fit(root, None)


@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe", "1f1b", "zb"])
def test_two_stages_train_like_one_process(schedule, single, tmp_path):
    _, single_module, want = single
    module, got = fit(tmp_path, schedule, callbacks=[ParamsHeld()])
    assert sorted(got["train/loss"]) == [0, 1, 2]
    # while training, rank 0 holds only its pieces; under DualPipe with 2 ranks both pieces are on both
    total = sum(p.numel() for p in module.parameters())
    held = set(got["params_held"].values())
    assert (held == {total}) if schedule == "dualpipe" else (max(held) < total)
    for key in ("train/loss", "train/ce", "train/mtp_loss", "val/loss", "val/accuracy", "val/mtp_loss"):
        assert got[key].keys() == want[key].keys(), key
        for step in want[key]:
            assert got[key][step] == pytest.approx(want[key][step], rel=1e-5), (key, step)
    assert_trained_alike(module, single_module)  # the process that called fit gets the whole trained model back


def test_checkpoint_from_two_stages_resumes_on_one_process(single, tmp_path):
    _, _, want = single
    fit(tmp_path / "pp", "dualpipev")  # 3 steps (the learning-rate schedule's length), saved after 2
    ckpt = tmp_path / "pp" / "ckpt" / "epoch=0-step=2.ckpt"
    assert ckpt.is_dir()  # sharded: each rank wrote its pieces
    state = read_checkpoint(ckpt)
    assert state["state_dict"].keys() == make_module().state_dict().keys()  # reads as the whole model
    assert len(state["optimizer_states"][0]["state"]) == sum(1 for _ in make_module().parameters())
    _, resumed = fit(tmp_path / "one", None, ckpt_path=str(ckpt))
    assert last(resumed["train/loss"]) == pytest.approx(want["train/loss"][2], rel=1e-5)


def test_checkpoint_from_one_process_resumes_on_two_stages(single, tmp_path):
    root, _, want = single
    _, resumed = fit(tmp_path, "dualpipev", ckpt_path=str(root / "ckpt" / "epoch=0-step=2.ckpt"))
    assert last(resumed["train/loss"]) == pytest.approx(want["train/loss"][2], rel=1e-5)


def test_refusals_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"init_args.expert_parallel_size \(0\) must be >= 1"):
        DualPipeStrategy(2, 4, "dualpipev", expert_parallel_size=0)
    with pytest.raises(ValueError, match=r"init_args.timeout \(0\) must be a positive number of seconds"):
        DualPipeStrategy(2, 4, "dualpipev", timeout=0)
    with pytest.raises(
        ValueError, match=r"pipeline_parallel_size \(3\) must be even for schedule 'dualpipe'"
    ):
        DualPipeStrategy(3, 12, "dualpipe")
    with pytest.raises(
        ValueError, match=r"num_microbatches \(3\) must be >= 2 \* pipeline_parallel_size \(4\)"
    ):
        DualPipeStrategy(2, 3, "dualpipev")
    with pytest.raises(RuntimeError, match="no pipeline before Trainer setup"):
        DualPipeStrategy(2, 4)._runner()


def _balancing():
    return [AuxLossFreeBalancing(1e-2), SequenceBalanceLoss(1e-2), ExpertLoadMonitor(heatmap=False)]


@pytest.fixture(scope="module")
def single_balanced(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("single_balanced"), None, callbacks=_balancing())[1]


@pytest.mark.parametrize("schedule", ["dualpipev", "zb"])
def test_balance_loss_and_load_metrics_are_the_global_batch_values(schedule, single_balanced, tmp_path):
    """The sequence-wise loss (its layers on both ranks, its gradient started in each layer), the bias
    update and the load monitor under a pipeline log what one process logs on the same batch, and train
    alike (alpha 1e-2, 100x V3's, so that the loss's gradient shows in the losses)."""
    _, got = fit(tmp_path, schedule, callbacks=_balancing())
    keys = ["train/loss", "train/ce", "train/seq_balance_loss", "train/max_vio", "train/bias_abs_mean",
            "val/loss", "val/max_vio"]
    for key in keys:
        assert got[key].keys() == single_balanced[key].keys(), key
        for step, want in single_balanced[key].items():
            assert got[key][step] == pytest.approx(want, rel=1e-5), (key, step)
    assert min(single_balanced["train/seq_balance_loss"].values()) > 0


def test_processes_must_fill_whole_pipelines():
    """Checked when the Trainer is built, before any process starts (the test of P x E meshes is in
    test_pipeline_expert_strategy.py)."""
    with pytest.raises(
        ValueError,
        match=r"trainer.devices x trainer.num_nodes \(1\) must be a multiple of "
        r"trainer.strategy.init_args.pipeline_parallel_size \(2\) x trainer.strategy.init_args.expert_parallel_size "
        r"\(1\) = 2: .*set trainer.devices to a multiple of 2",
    ):
        L.Trainer(accelerator="cpu", devices=1, strategy=DualPipeStrategy(2, 4, start_method="fork"), logger=False)
