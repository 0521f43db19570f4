"""ExpertParallelStrategy: DeepSeek-V3's expert parallelism (SPEC.md §8) as a Lightning strategy.

    trainer:
      devices: 4
      strategy:
        class_path: dsv3_lightning.plugins.expert_parallel.ExpertParallelStrategy
        init_args: {expert_parallel_size: 2}        # 2 data × 2 expert ranks

The processes form a data × expert mesh (mesh.py). Every MoE layer's routed experts (the model's
and the MTP heads') are split evenly over the expert ranks (sharding.py); its dispatcher sends each
token copy to the rank of its expert and back by all-to-all with uneven splits (dispatcher.py).
Attention, dense MLPs, routers and shared experts are replicated. Each rank reads its own slice of
the global batch (DDP's distributed sampler over the whole world).

It is the parallel layer's strategy (``dsv3_lightning.plugins.parallel.ParallelStrategy``: the mesh,
the shards, the one gradient synchronisation, checkpoints, teardown) with one pipeline position. What
it adds is where the step synchronises: after the last backward of an optimizer step, gradients are
reduced and, if ``trainer.gradient_clip_val`` is set with the "norm" algorithm, clipped by the norm of
the whole model: the step equals a single process stepping on the whole global batch. (Lightning's own
clipping then finds nothing left to clip; ``on_before_optimizer_step`` hooks see reduced, clipped
gradients.)

Checkpoints are the parallel layer's: each rank writes its own shard into a sharded directory, which
resumes with any expert_parallel_size (or pipeline, or one process) and converts with ``dsv3
convert``; ``checkpoint_format: full`` gathers one ordinary file instead. Optimizer state is sharded
over data parallelism with ``zero1``. A module built with values (from Python) has its shards
gathered back when the run ends normally, so that it is a plain model again; one built shard-first
by ``dsv3 fit`` never holds more than its share.

A rank that dies or stops answering makes the others raise ``ExpertParallelCommError`` after at most
``timeout`` seconds (every process group of the run uses it), naming the collective and the key.

Redundant experts (DeepSeek-V3's serving layout, placement.py and replicas.py): with
``redundant_experts: S`` (and/or ``expert_loads``) ``dsv3 validate`` / ``test`` / ``predict`` place every
MoE layer's E experts on E + S slots from the loads a run recorded (the checkpoint's ExpertLoadMonitor
state, or a file), duplicating the most loaded ones, so that every expert rank gets about the same
tokens; routing is unchanged and so are the results (the same logits within 1e-6 relative). The
checkpoint loads in the even layout, the experts move to their slots when the evaluation starts and
back when it ends. ``fit`` with redundant experts is refused (copies of an expert would need their
gradients summed and identical steps). The per-rank token load (max / mean over the expert ranks, per
MoE layer, with or without redundant experts) is logged as ``ep/{train,val,test}_rank_load_max_over_mean``:
in training every ``trainer.log_every_n_steps`` steps, in evaluation at its end (also printed).

Not supported: 16-bit precision with a gradient scaler together with norm clipping ("16-mixed"; use
"bf16-mixed"), training with redundant experts. Pipeline parallelism with expert parallelism inside it is
DualPipeStrategy's ``expert_parallel_size``, which reuses this package's pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dsv3_lightning.model.router import Router
from dsv3_lightning.plugins.expert_parallel.all_to_all import collective
from dsv3_lightning.plugins.expert_parallel.placement import ExpertPlacement, imbalance, place_experts
from dsv3_lightning.plugins.expert_parallel.replicas import (
    PlacedExperts,
    check_loads,
    checked_placement,
    read_expert_loads,
)
from dsv3_lightning.plugins.expert_parallel.sharding import moe_layers
from dsv3_lightning.plugins.parallel.mesh import KEY
from dsv3_lightning.plugins.parallel.strategy import ParallelStrategy, check_model


class ExpertParallelStrategy(ParallelStrategy):
    """Routed experts sharded over ranks, tokens moved to them by all-to-all.

    Args:
        expert_parallel_size: Ranks that share one copy of the experts; ``trainer.devices ×
            trainer.num_nodes`` must be a multiple (the rest is data parallelism), and
            ``model.config.n_routed_experts`` too.
        redundant_experts: Extra expert slots per MoE layer for evaluation (DeepSeek-V3's redundant
            experts): the most loaded experts get copies there. A multiple of ``expert_parallel_size``
            (every rank gets the same number of slots), at most ``n_routed_experts × (expert_parallel_size
            − 1)``. Not with ``fit``.
        expert_loads: Where the per-expert loads for the placement come from: a checkpoint of a run with
            the ExpertLoadMonitor callback (file or sharded directory), or a torch file of a [MoE layers,
            experts] tensor. Unset: the checkpoint being evaluated (``--ckpt_path``). Setting it with
            ``redundant_experts`` 0 re-places the experts without copies.
        placement: The placement function (``placement.py``'s ``place_experts`` signature, e.g. a
            dotted path in YAML); default ``place_experts``, hierarchical over nodes of
            ``ranks_per_node`` ranks when set.
        max_nodes_per_token, ranks_per_node, fp8_dispatch, zero1, checkpoint_format, timeout,
            start_method: as ``ParallelStrategy`` (node-limited routing, FP8 dispatch, ZeRO-1, the
            checkpoint format, the collectives' timeout, launch).
    """

    strategy_name = "expert_parallel"

    def __init__(
        self,
        expert_parallel_size: int,
        *,
        redundant_experts: int = 0,
        expert_loads: str | None = None,
        placement: Callable[..., ExpertPlacement] | None = None,
        **kwargs: Any,
    ) -> None:
        if redundant_experts < 0:
            raise ValueError(
                f"{KEY}.redundant_experts ({redundant_experts}) must be >= 0 (0: no redundant experts)"
            )
        if expert_parallel_size >= 1 and redundant_experts % expert_parallel_size:  # < 1: the base says so
            raise ValueError(
                f"{KEY}.redundant_experts ({redundant_experts}) must be a multiple of {KEY}.expert_parallel_size "
                f"({expert_parallel_size}), so that the physical experts divide over the ranks (every rank the same "
                f"number of slots): use a multiple such as {(redundant_experts // expert_parallel_size + 1) * expert_parallel_size}"
            )
        if expert_parallel_size == 1 and (redundant_experts or expert_loads is not None):
            raise ValueError(
                f"{KEY}.redundant_experts ({redundant_experts}) / expert_loads ({expert_loads}) balance the tokens over "
                f"expert ranks, but {KEY}.expert_parallel_size is 1 (every expert on every rank): raise "
                "expert_parallel_size, or set redundant_experts 0 and expert_loads null"
            )
        super().__init__(expert_parallel_size=expert_parallel_size, **kwargs)  # YAML sees the base's options
        self.redundant_experts = redundant_experts
        self.expert_loads = expert_loads
        self.placement_fn = placement or place_experts
        self.places_experts = redundant_experts > 0 or expert_loads is not None
        self.placement: ExpertPlacement | None = None
        """The last evaluation's placement (None before one, or without redundant experts)."""
        self.rank_load: dict[str, Any] = {}
        """The last logged tokens per expert rank: ``stage`` ("train", "validation", "test", "predict"),
        ``rank_loads_LR`` [MoE layers, R] (summed over data replicas) and ``max_over_mean_L``."""
        self._placed: PlacedExperts | None = None
        self._router_start: torch.Tensor | None = None
        self._loads_LE: torch.Tensor | None = None
        self._train_start: torch.Tensor | None = None
        """Router totals at the last training log (None outside fit)."""
        self._eval_routed: torch.Tensor | int | None = None
        """Tokens the evaluations inside fit routed since then (not training's)."""
        self._train_logged_step = -1

    @override
    def check_model(self, module: torch.nn.Module) -> None:
        super().check_model(module)
        if self.places_experts:
            moe = moe_layers(module)[0][1]
            num_experts, R, S = moe.experts.num_experts, self.expert_parallel_size, self.redundant_experts
            nodes = self._placement_nodes()
            if nodes > 1 and moe.gate.n_group % nodes == 0:  # hierarchical: copies stay on their group's node
                if S > num_experts * (R // nodes - 1):
                    raise ValueError(
                        f"{KEY}.redundant_experts ({S}) asks for {(num_experts + S) // R} slots per rank, more than the "
                        f"{num_experts // nodes} experts of a node ({KEY}.ranks_per_node {self.ranks_per_node}) a rank can "
                        f"hold one copy each of: use at most {num_experts * (R // nodes - 1)}, or more ranks per node"
                    )
            elif S > num_experts * (R - 1):
                raise ValueError(
                    f"{KEY}.redundant_experts ({S}) asks for {(num_experts + S) // R} slots per rank, more than the "
                    f"{num_experts} experts (model.config.n_routed_experts) a rank can hold one copy each of: use at "
                    f"most {num_experts * (R - 1)}"
                )

    def _placement_nodes(self) -> int:
        """Nodes of the hierarchical placement: expert_parallel_size / ranks_per_node when that cuts the
        expert group into several nodes, else 1."""
        R, r = self.expert_parallel_size, self.ranks_per_node
        return R // r if r is not None and 1 < r < R and R % r == 0 else 1

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if self.places_experts and trainer.state.fn == TrainerFn.FITTING:
            raise NotImplementedError(
                f"{KEY}.redundant_experts ({self.redundant_experts}) / expert_loads ({self.expert_loads}) place experts for "
                "dsv3 validate, test and predict only: training with copies of an expert would need their gradients "
                f"summed and identical optimizer steps. Set {KEY}.redundant_experts to 0 and expert_loads to null for fit"
            )
        super().setup(trainer)

    @override
    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        def synchronised_closure():
            result = closure()
            self.sync_gradients()
            return result

        return super().optimizer_step(optimizer, synchronised_closure, model, **kwargs)

    # ------------------------------------------------------------------ evaluation: placement, rank loads
    def _moe_rows(self) -> list[int]:
        """For each expert shard, its row in the recorded loads: ExpertLoadMonitor's router order (the
        model's MoE layers, then those of the prediction heads)."""
        module = self.lightning_module
        routers = list(module.model.routers()) + [
            m for head in getattr(module, "heads", []) for m in head.modules() if isinstance(m, Router)
        ]
        index = {id(r): i for i, r in enumerate(routers)}
        return [index[id(shard.moe.gate)] for shard in self._shards]

    def expert_loads_for_placement(self) -> torch.Tensor:
        """[MoE layers, E]: the loads to place by, rows in this strategy's shard order (override to take
        them from elsewhere)."""
        key = f"{KEY}.expert_loads"
        source = self.expert_loads or getattr(self.lightning_module.trainer, "ckpt_path", None)
        if source is None:
            raise ValueError(
                f"{KEY}.redundant_experts ({self.redundant_experts}) needs recorded expert loads: set {key} to a checkpoint "
                "of a run with the ExpertLoadMonitor callback (or a torch file of a [layers, experts] tensor), or "
                "evaluate a checkpoint (--ckpt_path) that has them"
            )
        loads = read_expert_loads(source, key)
        rows = self._moe_rows()
        check_loads(loads, len(rows), self._shards[0].num_experts, key, source)
        return loads[rows]

    def compute_placement(self, loads_LE: torch.Tensor) -> ExpertPlacement:
        """The placement of every MoE layer (``placement`` with this run's ranks, nodes and groups), checked."""
        return checked_placement(
            self.placement_fn,
            loads_LE,
            self._shards[0].num_experts + self.redundant_experts,
            self.expert_parallel_size,
            num_nodes=self._placement_nodes(),
            num_groups=self._shards[0].moe.gate.n_group,
            key=f"{KEY}.placement",
        )

    def _router_totals(self) -> torch.Tensor:
        """[MoE layers, E]: tokens this rank's routers have sent to each expert so far (every forward)."""
        return torch.stack([shard.moe.gate.tokens_routed_total.detach() for shard in self._shards])

    def _start_evaluation(self) -> None:
        if not self._shards:
            return
        self._router_start = self._router_totals()
        if not self.places_experts:
            return
        if self.placement is None:
            self._loads_LE = self.expert_loads_for_placement()
            self.placement = self.compute_placement(self._loads_LE)
        mesh = self.mesh
        self._placed = PlacedExperts(
            self._shards,
            self.placement,
            self.make_dispatcher,
            mesh.expert_rank,
            self._expert_comm("expert placement"),
            rotation=mesh.replica_rank,
        )
        before = imbalance(
            ExpertPlacement.even(
                len(self._shards), self._shards[0].num_experts, mesh.expert_parallel_size
            ).rank_loads(self._loads_LE)
        )
        after = imbalance(self.placement.rank_loads(self._loads_LE))
        rank_zero_info(
            f"{self.strategy_name}: {self.placement.num_physical_experts} slots per MoE layer "
            f"({self.redundant_experts} redundant), {self.placement.slots_per_rank} per rank; predicted rank load "
            f"max/mean from the recorded loads: {before.mean():.3f} even -> {after.mean():.3f} placed"
        )

    def _end_evaluation(self, stage: str) -> None:
        if not self._shards:
            return
        routed_LE = self._router_totals() - self._router_start
        if self._eval_routed is not None:  # inside fit: not the training interval's tokens
            self._eval_routed += routed_LE
        if self._placed is not None:
            slots_LP = torch.stack([d.tokens_per_slot_P for d in self._placed.dispatchers()])
            self._placed.restore()
            self._placed = None
        else:
            slots_LP = routed_LE  # the even layout: slot = expert
        self._log_rank_load(stage, slots_LP)

    def _log_rank_load(self, stage: str, slots_LP: torch.Tensor) -> None:
        """Sums this rank's tokens per slot over the block (collective), then logs and prints the
        tokens per expert rank's max / mean per MoE layer as ``ep/{stage}_rank_load_max_over_mean``."""
        R = self.expert_parallel_size
        total = slots_LP.to(self.root_device, torch.float64)  # counts stay on the device until the one read below
        comm = self.mesh.comm(self.mesh.block_group, "per-rank load logs")
        collective(comm, "rank-load all-reduce", lambda: dist.all_reduce(total, group=comm.group))
        rank_loads_LR = total.cpu().view(len(self._shards), R, -1).sum(-1)
        if rank_loads_LR.sum() == 0:  # the same on every rank: nothing routed since the last log
            return
        ratio_L = imbalance(rank_loads_LR)
        self.rank_load = {"stage": stage, "rank_loads_LR": rank_loads_LR, "max_over_mean_L": ratio_L}
        name = {"validation": "val"}.get(stage, stage)
        metrics = {f"ep/{name}_rank_load_max_over_mean": float(ratio_L.mean())}
        metrics.update(
            {f"ep/{name}_rank_load_max_over_mean/moe_{i}": float(v) for i, v in enumerate(ratio_L)}
        )
        trainer = self.lightning_module.trainer
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if stage != "train":
            rank_zero_info(
                f"{self.strategy_name}: {stage} tokens per expert rank, max/mean over {R} ranks per MoE layer: "
                + ", ".join(f"{v:.3f}" for v in ratio_L.tolist())
                + (" (redundant experts placed)" if self.places_experts else "")
            )

    # ------------------------------------------------------------------ training: per-rank load logs
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Every ``trainer.log_every_n_steps`` optimizer steps: the tokens per expert rank of the
        training forwards since the last log (evaluations in between left out)."""
        super().on_train_batch_start(batch, batch_idx)
        if not self._shards:
            return
        trainer = self.lightning_module.trainer
        step = trainer.global_step
        if self._train_start is None:
            self._train_start, self._eval_routed, self._train_logged_step = self._router_totals(), 0, step
        elif step != self._train_logged_step and step % max(trainer.log_every_n_steps, 1) == 0:
            self._log_train_interval(step)

    def _log_train_interval(self, step: int) -> None:
        now = self._router_totals()
        self._log_rank_load("train", now - self._train_start - self._eval_routed)
        self._train_start, self._eval_routed, self._train_logged_step = now, 0, step

    @override
    def on_train_end(self) -> None:
        if self._shards and self._train_start is not None:
            self._log_train_interval(self.lightning_module.trainer.global_step)
        self._train_start = self._eval_routed = None
        super().on_train_end()

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._start_evaluation()

    @override
    def on_validation_end(self) -> None:
        self._end_evaluation("validation")
        super().on_validation_end()

    @override
    def on_test_start(self) -> None:
        super().on_test_start()
        self._start_evaluation()

    @override
    def on_test_end(self) -> None:
        self._end_evaluation("test")
        super().on_test_end()

    @override
    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._start_evaluation()

    @override
    def on_predict_end(self) -> None:
        self._end_evaluation("predict")
        super().on_predict_end()


__all__ = ["KEY", "ExpertParallelStrategy", "check_model"]
