"""DualPipeStrategy with expert parallelism in Lightning: 2 pipeline x 2 expert processes (4, forked) train
like 1 process on the same global batches, log the global batch's values, validate, and save ordinary
full checkpoints (resumed on 1 process, and the reverse); bad mesh sizes fail with the key and the fix."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from dsv3_lightning.plugins.dualpipe import DualPipeStrategy
from dualpipe_tiny import (
    ReplicaSampler,
    assert_trained_alike,
    last,
    make_module,
    make_tokens,
    make_trainer,
    metrics,
    read_checkpoint,
)
from torch.utils.data import DataLoader

WINDOWS = make_tokens(16, seed=1)  # 2 global batches of 8 per epoch
GLOBAL_BATCH = 8


class ExpertsPerRank(L.Callback):
    """Logs how many routed experts of the last MoE layer this process runs (the CSV keeps rank 0's)."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        pl_module.log("experts_per_rank", float(pl_module.model.model.layers[-1].mlp.experts.num_experts))


class OverlappedAllToAlls(L.Callback):
    """Logs how many all-to-alls the strategy's overlap hook has issued inside (F;B) pairs so far."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        hook = trainer.strategy.runner.overlap
        pl_module.log("overlapped_all_to_alls", float(hook.interleaver.stats.in_pairs if hook else -1))


def fit(
    root,
    expert_parallel_size: int | None,
    *,
    schedule: str = "dualpipev",
    max_steps: int = 3,
    ckpt_path: str | None = None,
    callbacks=(),
    **kwargs,
):
    """The tiny model (MoE + MTP), 4 micro-batches per pipeline: on 2 pipeline x ``expert_parallel_size``
    processes with ``schedule``, or on 1 process (None). Every run reads the same global batches of 8
    windows, each pipeline its share."""
    if expert_parallel_size is None:
        strategy, devices = None, 1
    else:
        strategy = DualPipeStrategy(
            2, 4, schedule, expert_parallel_size=expert_parallel_size, start_method="fork", timeout=120
        )
        devices = 2 * expert_parallel_size
    module = make_module()
    batch = GLOBAL_BATCH * 2 // devices if expert_parallel_size else GLOBAL_BATCH  # per pipeline
    run = make_trainer(root, devices, strategy, max_steps=max_steps, callbacks=[ExpertsPerRank(), *callbacks], **kwargs)
    run.fit(
        module,
        DataLoader(list(WINDOWS), batch_size=batch, sampler=ReplicaSampler(16, strategy)),
        DataLoader(list(WINDOWS[:8]), batch_size=batch, sampler=ReplicaSampler(8, strategy)),
        ckpt_path=ckpt_path,
        weights_only=False,  # hparams hold a ModelConfig
    )
    return module, metrics(root)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return root, *fit(root, None)


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp2ep2")
    return root, *fit(root, 2, callbacks=[OverlappedAllToAlls()])


def test_pipeline_with_expert_parallelism_trains_like_one_process(single, mesh_run):
    _, single_module, want = single
    _, module, got = mesh_run
    assert sorted(got["train/loss"]) == [0, 1, 2]
    assert set(got["experts_per_rank"].values()) == {4.0}  # 8 experts, 2 expert ranks
    assert max(got["overlapped_all_to_alls"].values()) > 0  # dualpipev's pairs ran overlapped (our runtime)
    for key in ("train/loss", "train/ce", "train/mtp_loss", "val/loss", "val/accuracy", "val/mtp_loss"):
        assert got[key].keys() == want[key].keys(), key
        for step in want[key]:
            assert got[key][step] == pytest.approx(want[key][step], rel=1e-5), (key, step)
    # the process that called fit gets the whole model back: experts gathered, every piece filled
    assert_trained_alike(module, single_module)


def test_dualpipe_with_overlapped_pairs_trains_like_one_process(single, tmp_path):
    _, single_module, want = single
    module, got = fit(tmp_path, 2, schedule="dualpipe", callbacks=[OverlappedAllToAlls()])
    for key in ("train/loss", "train/ce", "train/mtp_loss", "val/loss"):
        for step in want[key]:
            assert got[key][step] == pytest.approx(want[key][step], rel=1e-5), (key, step)
    assert max(got["overlapped_all_to_alls"].values()) > 0  # the strategy chose InterleavedOverlap, and it took turns
    assert_trained_alike(module, single_module)


def test_checkpoint_from_the_mesh_resumes_on_one_process(single, mesh_run, tmp_path):
    single_root, single_module, want = single
    root, _, _ = mesh_run
    ckpt = root / "ckpt" / "epoch=0-step=2.ckpt"

    def shapes(path):  # read whole, the single process's tensors, optimizer state included
        state = read_checkpoint(path)
        optimizer = {
            i: {k: v.shape for k, v in s.items()} for i, s in state["optimizer_states"][0]["state"].items()
        }
        return {k: v.shape for k, v in state["state_dict"].items()}, optimizer

    assert shapes(ckpt) == shapes(single_root / "ckpt" / "epoch=0-step=2.ckpt")
    module, resumed = fit(tmp_path, None, ckpt_path=str(ckpt))
    assert last(resumed["train/loss"]) == pytest.approx(want["train/loss"][2], rel=1e-5)
    assert_trained_alike(module, single_module)  # the last step used the optimizer state saved by the mesh


def test_checkpoint_from_one_process_resumes_on_the_mesh(single, tmp_path):
    root, single_module, want = single
    module, resumed = fit(tmp_path, 2, ckpt_path=str(root / "ckpt" / "epoch=0-step=2.ckpt"))
    assert last(resumed["train/loss"]) == pytest.approx(want["train/loss"][2], rel=1e-5)
    assert_trained_alike(module, single_module)  # the optimizer state was sliced to the shards


def test_world_size_must_be_a_multiple_of_pipeline_times_expert():
    with pytest.raises(
        ValueError,
        match=r"trainer.devices x trainer.num_nodes \(6\) must be a multiple of "
        r"trainer.strategy.init_args.pipeline_parallel_size \(2\) x "
        r"trainer.strategy.init_args.expert_parallel_size \(2\) = 4: .*set trainer.devices to a multiple of 4",
    ):
        L.Trainer(
            accelerator="cpu",
            devices=6,
            strategy=DualPipeStrategy(2, 4, expert_parallel_size=2),
            logger=False,
        )


def test_each_pipeline_reads_its_own_replica(monkeypatch):
    """rank = position x (E x D) + pipeline index (mesh.py): the P ranks of a pipeline read one replica."""
    strategy = DualPipeStrategy(2, 4, expert_parallel_size=2, start_method="fork")
    L.Trainer(accelerator="cpu", devices=4, strategy=strategy, logger=False)
    replicas = []
    for rank in range(4):  # (set_global_rank would also set Lightning's global rank_zero_only.rank)
        monkeypatch.setattr(strategy.cluster_environment, "global_rank", lambda rank=rank: rank)
        replicas.append(strategy.distributed_sampler_kwargs)
    assert replicas == [{"num_replicas": 2, "rank": r} for r in (0, 1, 0, 1)]


def test_experts_must_divide_and_exist():
    strategy = DualPipeStrategy(2, 4, expert_parallel_size=3)
    with pytest.raises(
        ValueError,
        match=r"model.config.n_routed_experts \(8, layer model.model.layers.1.mlp\) must be divisible by "
        r"trainer.strategy.init_args.expert_parallel_size \(3\): change one of them",
    ):
        strategy.connect(make_module())
    dense = make_module(mtp=False, first_k_dense_replace=4)
    with pytest.raises(
        ValueError,
        match=r"DualPipeStrategy with trainer.strategy.init_args.expert_parallel_size 2 shards MoE layers, but "
        r"the model has none .*set trainer.strategy.init_args.expert_parallel_size to 1",
    ):
        DualPipeStrategy(2, 4, expert_parallel_size=2).connect(dense)
    with pytest.raises(ValueError, match=r"expert_parallel_size \(0\) must be >= 1"):
        DualPipeStrategy(2, 4, expert_parallel_size=0)
    with pytest.raises(RuntimeError, match="mesh exists only after Trainer setup"):
        _ = DualPipeStrategy(2, 4).mesh
