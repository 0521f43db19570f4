"""Redundant experts under ExpertParallelStrategy (replicas.py): validate and test on gloo give the
logits and metrics of the plain expert-parallel run (1e-6 relative), every token copy goes to a copy
of its own expert, the per-rank load measured on the same data falls, the experts return to the even
layout afterwards, and fit is refused."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from ep_tiny import GLOBAL_BATCH, SEQ, StridedSampler, fit, make_module, make_tokens
from dsv3_lightning.plugins.expert_parallel import ExpertParallelStrategy
from dsv3_lightning.plugins.expert_parallel.placement import ExpertPlacement, imbalance, place_experts
from dsv3_lightning.plugins.expert_parallel.replicas import read_expert_loads
from dsv3_lightning.plugins.load_balancing import ExpertLoadMonitor
from lightning.pytorch.callbacks import ModelCheckpoint
from dsv3_lightning.plugins.expert_parallel.sharding import moe_layers
from torch.utils.data import DataLoader

VAL = make_tokens(4 * GLOBAL_BATCH, seed=1)
PROBE = make_tokens(4, seed=2)[:, :-2]  # the same inputs on every rank, for logits


class Record(L.Callback):
    """Each rank saves the logits of PROBE (computed while the placement is active), the experts'
    tokens per layer over the evaluation (from the routers' running totals) and, at teardown, what the
    strategy measured and placed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _start(self, trainer, pl_module):
        self.start = [m.gate.tokens_routed_total.clone() for _, m in moe_layers(pl_module)]

    def _end(self, trainer, pl_module, stage):
        with torch.no_grad():
            logits = pl_module.model(PROBE).logits
        load = torch.stack(
            [m.gate.tokens_routed_total - s for (_, m), s in zip(moe_layers(pl_module), self.start)]
        )
        torch.save({"logits": logits, "load": load}, self.root / f"{stage}{trainer.global_rank}.pt")

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._end(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer, pl_module):
        self._start(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module):
        self._end(trainer, pl_module, "test")

    def teardown(self, trainer, pl_module, stage):
        if trainer.is_global_zero:
            strategy, name = trainer.strategy, getattr(stage, "value", stage)  # a TrainerFn
            saved = {
                "rank_load": getattr(strategy, "rank_load", None),
                "placement": getattr(strategy, "placement", None),
            }
            torch.save(saved, self.root / f"strategy_{name}.pt")


def evaluate(
    root: Path, devices: int, stages=("validate", "test"), ckpt_path=None, **strategy_kwargs
) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    module = make_module()
    want_state = {k: v.clone() for k, v in module.state_dict().items()}
    strategy = (
        ExpertParallelStrategy(devices, start_method="fork", timeout=60, **strategy_kwargs)
        if devices > 1
        else "auto"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[Record(root)],
    )
    loader = DataLoader(list(VAL), batch_size=GLOBAL_BATCH // devices, sampler=StridedSampler(len(VAL)))
    out = {"module_unchanged": True}
    for stage in stages:
        out[stage] = getattr(trainer, stage)(module, loader, ckpt_path=ckpt_path, weights_only=False)[0]
        out[f"{stage}_ranks"] = [torch.load(root / f"{stage}{r}.pt") for r in range(devices)]
        out[f"{stage}_strategy"] = torch.load(root / f"strategy_{stage}.pt", weights_only=False)
        if ckpt_path is not None:
            want_state = {k: v.clone() for k, v in module.state_dict().items()}
        # the launcher copies rank 0's module back: the placement was undone, the shards gathered
        out["module_unchanged"] &= all(torch.equal(module.state_dict()[k], v) for k, v in want_state.items())
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return evaluate(tmp_path_factory.mktemp("plain"), 2)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def test_redundant_experts_give_plain_results_and_a_lower_rank_load(plain, tmp_path):
    """EP 2, 2 redundant slots (5 per rank), placed by the loads the plain run measured on this data."""
    load = sum(r["load"] for r in plain["validate_ranks"]).double()  # [MoE layers, E] over the whole set
    assert load.shape == (2, 8)  # layer 1 and the MTP block
    torch.save(load, tmp_path / "loads.pt")
    got = evaluate(tmp_path / "run", 2, redundant_experts=2, expert_loads=str(tmp_path / "loads.pt"))
    placement: ExpertPlacement = got["validate_strategy"]["placement"]
    assert placement.num_physical_experts == 10 and int(placement.replica_counts.max()) >= 2
    for stage in ("validate", "test"):
        for key, value in plain[stage].items():
            assert abs(got[stage][key] - value) <= 1e-6 * abs(value), (stage, key, got[stage][key], value)
        for rank in range(2):  # each rank chose its own replicas (rotation): each rank's logits
            error = _relative(got[f"{stage}_ranks"][rank]["logits"], plain[f"{stage}_ranks"][rank]["logits"])
            assert error <= 1e-6, (stage, rank, error)
    before = plain["validate_strategy"]["rank_load"]["max_over_mean_L"]
    after = got["validate_strategy"]["rank_load"]["max_over_mean_L"]
    # measured on the same data as the loads: the placement's rank load is the measured one's prediction
    measured_R = got["validate_strategy"]["rank_load"]["rank_loads_LR"]
    assert measured_R.sum() == plain["validate_strategy"]["rank_load"]["rank_loads_LR"].sum() == load.sum()
    torch.testing.assert_close(imbalance(placement.rank_loads(load)), after, atol=0.02, rtol=0)
    assert (after <= before).all() and after.mean() < before.mean(), (before, after)
    assert got["module_unchanged"] and plain["module_unchanged"]


def test_hierarchical_placement_over_two_nodes_with_two_hop_dispatch(plain, tmp_path):
    """EP 4 as 2 nodes x 2 ranks (two-hop dispatch underneath), 4 redundant slots: validation equals
    the plain EP 2 run's."""
    load = sum(r["load"] for r in plain["validate_ranks"]).double()
    torch.save({"expert_load": load}, tmp_path / "loads.pt")
    got = evaluate(
        tmp_path / "run",
        4,
        stages=("validate",),
        redundant_experts=4,
        ranks_per_node=2,
        expert_loads=str(tmp_path / "loads.pt"),
    )
    placement: ExpertPlacement = got["validate_strategy"]["placement"]
    group_of = torch.arange(8) // 2  # tiny: n_group 4 -> each group on one node
    node_of_slot = torch.arange(12) // 6
    for layer in range(2):
        for group in range(4):
            nodes = node_of_slot[group_of[placement.physical_to_logical[layer]] == group].unique()
            assert len(nodes) == 1, (layer, group, nodes)
    for key, value in plain["validate"].items():
        assert abs(got["validate"][key] - value) <= 1e-6 * abs(value), (key, got["validate"][key], value)
    for rank in range(4):
        assert _relative(got["validate_ranks"][rank]["logits"], plain["validate_ranks"][0]["logits"]) <= 1e-6
    assert got["module_unchanged"]


def test_placement_from_the_loads_the_evaluated_checkpoint_recorded(tmp_path):
    """expert_loads unset: the ExpertLoadMonitor state in the checkpoint passed to validate (--ckpt_path)."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "train", 1, 1, max_steps=2, callbacks=[ExpertLoadMonitor(heatmap=False), checkpoints])
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    recorded = read_expert_loads(ckpt, "k")
    assert recorded.shape == (2, 8)  # every token of 2 steps, K = 2 copies each, in each MoE layer
    assert (recorded.sum(-1) == 2 * GLOBAL_BATCH * SEQ * 2).all()
    want = evaluate(tmp_path / "one", 1, stages=("validate",), ckpt_path=ckpt)
    got = evaluate(tmp_path / "ep", 2, stages=("validate",), ckpt_path=ckpt, redundant_experts=2)
    placement: ExpertPlacement = got["validate_strategy"]["placement"]
    assert torch.equal(
        placement.physical_to_logical, place_experts(recorded, 10, 2, num_groups=4).physical_to_logical
    )
    for key, value in want["validate"].items():
        assert abs(got["validate"][key] - value) <= 1e-6 * abs(value), (key, got["validate"][key], value)
    for rank in range(2):
        assert _relative(got["validate_ranks"][rank]["logits"], want["validate_ranks"][0]["logits"]) <= 1e-6


def test_fit_with_redundant_experts_is_refused(tmp_path):
    strategy = ExpertParallelStrategy(2, start_method="fork", timeout=30, redundant_experts=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    loader = DataLoader(list(VAL), batch_size=4)
    with pytest.raises(Exception, match=r"redundant_experts \(2\).*validate, test and predict only.*to 0"):
        trainer.fit(make_module(), loader)
