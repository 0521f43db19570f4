"""Sharded checkpoints reshard, and ZeRO-1 trains like one process: a run saved by one mesh resumes on
another (PP2 x EP2 -> EP4, PP2, one process; one process and EP4 -> PP2 x EP2) with the losses and
weights of an uninterrupted single process, with the optimizer state sharded (zero1) or not.

Every run reads the same global batches of 8 windows (each replica its share) and clips by the global
norm (make_trainer: 0.05, so the sharded clipping is exercised); the checkpoint is the one saved at
the end of epoch 0 (step 2) and the resumed run takes step 3.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import lightning as L
import pytest
from dsv3_lightning.plugins.dualpipe import DualPipeStrategy
from dsv3_lightning.plugins.expert_parallel import ExpertParallelStrategy
from dualpipe_tiny import (
    assert_trained_alike,
    last,
    make_module,
    make_tokens,
    make_trainer,
    metrics,
    read_checkpoint,
)
from test_pipeline_expert_strategy import ReplicaSampler
from torch.utils.data import DataLoader

from dsv3_lightning.module import building_on_meta
from dsv3_lightning.sharded_checkpoint import is_sharded_checkpoint

WINDOWS = make_tokens(16, seed=1)
GLOBAL_BATCH = 8
STEP_2 = "ckpt/epoch=0-step=2.ckpt"


def strategy_for(layout: str | None, zero1: bool):
    """None: one process; "ep4": 4 expert ranks; "pp2": 2 pipeline ranks; "pp2ep2", "pp2ep2dp2"."""
    common = dict(start_method="fork", timeout=120, zero1=zero1)
    if layout is None:
        return None, 1
    if layout == "ep4":
        return ExpertParallelStrategy(4, **common), 4
    pp, ep, dp = {"pp2": (2, 1, 1), "pp2ep2": (2, 2, 1), "pp2ep2dp2": (2, 2, 2)}[layout]
    # 8 processes: 4 replicas of 2 windows, too few micro-batches for dualpipev (M >= 2 PP): 1f1b
    schedule, microbatches = ("1f1b", 2) if dp > 1 else ("dualpipev", 4)
    return DualPipeStrategy(2, microbatches, schedule, expert_parallel_size=ep, **common), pp * ep * dp


class HeldAtFitStart(L.Callback):
    """Writes the parameter elements each rank holds once the strategy has set up (before training)."""

    def __init__(self, root) -> None:
        self.root = root

    def on_fit_start(self, trainer, pl_module) -> None:
        held = sum(p.numel() for p in pl_module.parameters())
        (self.root / f"held-{trainer.global_rank}.json").write_text(json.dumps(held))


def fit(root, layout: str | None, *, zero1: bool = False, ckpt_path=None, on_meta: bool = False):
    strategy, devices = strategy_for(layout, zero1)
    replicas = devices // (strategy.pipeline_parallel_size if strategy else 1)
    batch = GLOBAL_BATCH // replicas
    with building_on_meta() if on_meta else nullcontext():  # as dsv3 fit builds it for these strategies
        module = make_module()
    run = make_trainer(root, devices, strategy, max_steps=3, callbacks=[HeldAtFitStart(root)])
    run.fit(
        module,
        DataLoader(list(WINDOWS), batch_size=batch, sampler=ReplicaSampler(16, strategy)),
        DataLoader(list(WINDOWS[:8]), batch_size=batch, sampler=ReplicaSampler(8, strategy)),
        ckpt_path=ckpt_path,
        weights_only=False,
    )
    return module, metrics(root)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return root, *fit(root, None)


def assert_continues_like_one_process(got: dict, module, single) -> None:
    """``module``: the trained module the launcher hands back (None after a shard-first run, whose rank 0
    holds only its share)."""
    _, single_module, want = single
    assert last(got["train/loss"]) == pytest.approx(want["train/loss"][2], rel=1e-5)
    assert last(got["train/ce"]) == pytest.approx(want["train/ce"][2], rel=1e-5)
    if module is not None:
        assert_trained_alike(module, single_module)


@pytest.fixture(scope="module")
def saved_by_pp2ep2(tmp_path_factory, single):
    root = tmp_path_factory.mktemp("pp2ep2-zero1")
    module, got = fit(root, "pp2ep2", zero1=True)
    _, single_module, want = single
    for step in (0, 1, 2):  # ZeRO-1 over the mesh trains like one process
        assert got["train/loss"][step] == pytest.approx(want["train/loss"][step], rel=1e-5), step
    assert_trained_alike(module, single_module)
    assert is_sharded_checkpoint(root / STEP_2)
    return root / STEP_2


@pytest.mark.parametrize(("layout", "zero1"), [("ep4", True), ("pp2", False), (None, False)])
def test_saved_by_pp2_ep2_resumes_on_another_mesh(saved_by_pp2ep2, single, tmp_path, layout, zero1):
    module, got = fit(tmp_path, layout, zero1=zero1, ckpt_path=str(saved_by_pp2ep2))
    assert_continues_like_one_process(got, module, single)


def test_saved_by_one_process_resumes_on_pp2_ep2_with_zero1(single, tmp_path):
    root, _, _ = single
    module, got = fit(tmp_path, "pp2ep2", zero1=True, ckpt_path=str(root / STEP_2))
    assert_continues_like_one_process(got, module, single)


def test_saved_by_ep4_resumes_on_pp2_ep2(single, tmp_path):
    fit(tmp_path / "ep4", "ep4", zero1=True)
    module, got = fit(tmp_path / "pp2ep2", "pp2ep2", ckpt_path=str(tmp_path / "ep4" / STEP_2))
    assert_continues_like_one_process(got, module, single)


def test_eight_processes_with_zero1_train_like_one(single, tmp_path):
    """PP2 x EP2 x DP2: replicated states sharded over 4 ranks, experts' over the 2 of their data group."""
    module, got = fit(tmp_path, "pp2ep2dp2", zero1=True)
    _, single_module, want = single
    for step in (0, 1, 2):
        assert got["train/loss"][step] == pytest.approx(want["train/loss"][step], rel=1e-5), step
    assert_trained_alike(module, single_module)


def test_built_on_meta_each_rank_materialises_only_its_share_and_trains_like_one_process(single, tmp_path):
    """Shard-first: PP2 x EP2 from a module built on meta; every rank initialises only its pieces and expert
    shard, by name, to the values a single process gives them, and trains like it (ZeRO-1 too)."""
    _, got = fit(tmp_path / "meta", "pp2ep2", zero1=True, on_meta=True)  # no module back: rank 0 holds a share
    single_root, single_module, want = single
    for step in (0, 1, 2):
        assert got["train/loss"][step] == pytest.approx(want["train/loss"][step], rel=1e-5), step
    saved, alone = (read_checkpoint(root / STEP_2)["state_dict"] for root in (tmp_path / "meta", single_root))
    assert saved.keys() == alone.keys()
    for name in alone:  # the weights after 2 steps, as every rank saved its share; AdamW's 1/sqrt(v) turns
        # rounding-level gradient differences of rarely routed experts into ~2e-5 of a tensor's scale
        diff, scale = float((saved[name] - alone[name]).abs().max()), float(alone[name].abs().max())
        assert diff <= 1e-4 * scale, (name, diff, scale)
    whole = sum(p.numel() for p in single_module.parameters())
    held = [json.loads((tmp_path / "meta" / f"held-{r}.json").read_text()) for r in range(4)]
    fit(tmp_path / "eager", "pp2ep2", zero1=True)  # built with values: whole until training starts
    eager = [json.loads((tmp_path / "eager" / f"held-{r}.json").read_text()) for r in range(4)]
    assert all(h < whole / 2 for h in held), (held, whole)  # its pipeline half, half of its experts
    assert all(e > h for e, h in zip(eager, held)), (eager, held)  # released only when training starts
    # and it resumes shard-first: every rank reads its share into its materialised pieces
    _, resumed = fit(tmp_path / "resumed", "pp2ep2", zero1=True, on_meta=True, ckpt_path=str(tmp_path / "meta" / STEP_2))
    assert_continues_like_one_process(resumed, None, single)
