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

This is DDP's process handling (launch, process group, barrier, ``reduce`` over the world, so the
balancing callbacks' counts cover the global batch) without the DDP wrapper, which would average
expert gradients over ranks holding different experts. Instead, after the last backward of an
optimizer step, gradients are reduced and, if ``trainer.gradient_clip_val`` is set with the "norm"
algorithm, clipped by the norm of the whole model (grad_sync.py): the step equals a single process
stepping on the whole global batch. (Lightning's own clipping then finds nothing left to clip;
``on_before_optimizer_step`` hooks see reduced, clipped gradients.)

Checkpoints hold the full model and full optimizer state, gathered from the shards when saved and
sliced when loaded, so they resume with any expert_parallel_size, load in a plain run, and export
with ``save_pretrained``. When a run ends normally the shards are gathered back into every rank's
module, which is then a plain model again.

A rank that dies or stops answering makes the others raise ``ExpertParallelCommError`` after at most
``timeout`` seconds (every process group of the run uses it), naming the collective and the key.

Not supported: 16-bit precision with a gradient scaler together with norm clipping ("16-mixed"; use
"bf16-mixed"), redundant experts (EPLB). Pipeline parallelism with expert parallelism inside it is
DualPipeStrategy's ``expert_parallel_size``, which reuses this package's pieces.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.grad_sync import clip_global_norm, reduce_gradients
from dsv3_lightning.plugins.expert_parallel.mesh import KEY, ExpertParallelMesh, mesh_shape
from dsv3_lightning.plugins.expert_parallel.node_limited import apply_node_limit, node_groups
from dsv3_lightning.plugins.expert_parallel.sharding import (
    ExpertShard,
    full_optimizer_state,
    full_state_dict,
    local_state_dict,
    moe_layers,
    shard_experts,
    sliced_optimizer_states,
    unshard_experts,
)
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class ExpertParallelStrategy(DDPStrategy):
    """Routed experts sharded over ranks, tokens moved to them by all-to-all.

    Args:
        expert_parallel_size: Ranks that share one copy of the experts; ``trainer.devices ×
            trainer.num_nodes`` must be a multiple (the rest is data parallelism), and
            ``model.config.n_routed_experts`` too.
        max_nodes_per_token: Node-limited routing: each token's experts on at most this many nodes
            (DeepSeek-V3: 4). It sets every router's ``n_group`` / ``topk_group`` to the nodes and M
            (node_limited.py), or checks that the model's already are. None leaves routing as configured.
        ranks_per_node: Expert ranks per node for node-limited routing; default ``trainer.devices``.
        fp8_dispatch: Send the dispatched activations as 1x128-tile FP8 (E4M3) with float32 scales,
            as DeepSeek-V3 does; combine and all gradients stay in the activations' dtype.
        timeout: Seconds a collective may wait before the run fails with a clear error.
        start_method: "popen" (re-run the command, as ``dsv3 fit``), "spawn" or "fork" (in-process
            launch: notebooks and tests).
    """

    strategy_name = "expert_parallel"

    def __init__(
        self,
        expert_parallel_size: int,
        *,
        max_nodes_per_token: int | None = None,
        ranks_per_node: int | None = None,
        fp8_dispatch: bool = False,
        timeout: float = 1800.0,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        if expert_parallel_size < 1:
            raise ValueError(f"{KEY}.expert_parallel_size ({expert_parallel_size}) must be >= 1")
        if timeout <= 0:
            raise ValueError(f"{KEY}.timeout ({timeout}) must be a positive number of seconds")
        if max_nodes_per_token is not None and max_nodes_per_token < 1:
            raise ValueError(f"{KEY}.max_nodes_per_token ({max_nodes_per_token}) must be >= 1 (or null: off)")
        super().__init__(start_method=start_method, timeout=timedelta(seconds=timeout), **kwargs)
        self.expert_parallel_size = expert_parallel_size
        self.max_nodes_per_token = max_nodes_per_token
        self.ranks_per_node = ranks_per_node
        self.fp8_dispatch = fp8_dispatch
        self.timeout_s = float(timeout)
        self._mesh: ExpertParallelMesh | None = None
        self._shards: list[ExpertShard] = []
        self._failed = False

    # ------------------------------------------------------------------ checks before launch
    @override
    def set_world_ranks(self) -> None:
        super().set_world_ranks()
        mesh_shape(self.num_nodes * self.num_processes, self.expert_parallel_size)

    @override
    def connect(self, model: pl.LightningModule) -> None:
        check_model(model, self.expert_parallel_size)
        super().connect(model)

    # ------------------------------------------------------------------ mesh and shards
    @property
    def mesh(self) -> ExpertParallelMesh:
        if self._mesh is None:
            raise RuntimeError(f"{type(self).__name__}.mesh exists only after Trainer setup (no process group yet)")
        return self._mesh

    def _comm(self, group, where: str) -> Comm:
        return Comm(group, self.timeout_s, where)

    def _shard(self) -> None:
        if self._mesh is not None:
            return
        module = self.lightning_module
        _sync_module_states(module)  # one initialisation everywhere (what DDP's wrapper would do)
        self._mesh = mesh = ExpertParallelMesh.create(self.expert_parallel_size, self.timeout_s)

        def make_dispatcher(name: str, num_experts: int) -> AllToAllTokenDispatcher:
            comm = self._comm(mesh.expert_group, f"layer {name}")
            return AllToAllTokenDispatcher(comm, num_experts, mesh.expert_parallel_size, fp8=self.fp8_dispatch)

        self._shards = shard_experts(module, mesh.expert_rank, mesh.expert_parallel_size, make_dispatcher)
        report = (
            f"expert parallel: {mesh.data_parallel_size} data × {mesh.expert_parallel_size} expert ranks; "
            f"{len(self._shards)} MoE layer(s), {self._shards[0].num_local_experts} of "
            f"{self._shards[0].num_experts} experts per rank"
        )
        if self.max_nodes_per_token is not None:
            nodes = node_groups(mesh.expert_parallel_size, self.ranks_per_node or self.num_processes)
            routers = [moe.gate for _, moe in moe_layers(module)]
            report += "; " + apply_node_limit(routers, self.max_nodes_per_token, nodes)
        rank_zero_info(report)

    def _expert_params(self) -> list[torch.nn.Parameter]:
        return [p for shard in self._shards for p in shard.params()]

    def _replicated_params(self) -> list[torch.nn.Parameter]:
        experts = {id(p) for p in self._expert_params()}
        return [p for p in self.lightning_module.parameters() if id(p) not in experts]

    @override
    def configure_ddp(self) -> None:
        self._shard()  # no DDP wrapper: gradients are reduced by optimizer_step (grad_sync.py)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.gradient_clip_val and getattr(self.precision_plugin, "scaler", None) is not None:
            raise NotImplementedError(
                f"trainer.gradient_clip_val ({trainer.gradient_clip_val}) with trainer.precision "
                f"({trainer.precision}) is not supported by {type(self).__name__}: the gradient scaler unscales after "
                "this strategy clips; use precision bf16-mixed or 32, or no clipping"
            )
        super().setup(trainer)
        self._shard()  # validate / test / predict: no configure_ddp

    # ------------------------------------------------------------------ the step
    @override
    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        def reduced_closure():
            result = closure()
            self.reduce_gradients()
            return result

        return super().optimizer_step(optimizer, reduced_closure, model, **kwargs)

    def reduce_gradients(self) -> None:
        """Makes every rank's gradients those of the global batch's loss, then clips by global norm."""
        mesh = self.mesh
        reduce_gradients(self._replicated_params(), self._comm(mesh.group, "the replicated parameters"), mesh.world_size)
        reduce_gradients(self._expert_params(), self._comm(mesh.data_group, "the expert shards"), mesh.world_size)
        trainer = self.lightning_module.trainer
        if trainer.gradient_clip_val and (trainer.gradient_clip_algorithm or "norm") == "norm":
            clip_global_norm(
                self._replicated_params(),
                self._expert_params(),
                self._comm(mesh.expert_group, "the expert shards"),
                float(trainer.gradient_clip_val),
            )

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        if not self._shards:
            return state
        return full_state_dict(state, self._shards, self._comm(self.mesh.expert_group, "the checkpoint"))

    @override
    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        if not self._shards:
            return super().load_model_state_dict(checkpoint, strict)
        self.lightning_module.load_state_dict(local_state_dict(checkpoint["state_dict"], self._shards), strict=strict)

    @override
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        if not self._shards:
            return state
        opt = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        return full_optimizer_state(opt, state, self._shards, self._comm(self.mesh.expert_group, "the checkpoint"))

    @override
    def load_optimizer_state_dict(self, checkpoint) -> None:
        if not self._shards:
            return super().load_optimizer_state_dict(checkpoint)
        super().load_optimizer_state_dict(sliced_optimizer_states(checkpoint, self.optimizers, self._shards))

    # ------------------------------------------------------------------ end
    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # no collectives in teardown: the other ranks may be gone
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        if self._shards and not self._failed:
            unshard_experts(self._shards, self._comm(self.mesh.expert_group, "teardown"))
        self._shards, self._mesh = [], None
        super().teardown()


def check_model(
    module: torch.nn.Module,
    expert_parallel_size: int,
    *,
    strategy: str = "ExpertParallelStrategy",
    instead: str = "train with strategy ddp",
) -> None:
    """Clear errors for models expert parallelism cannot split (``strategy`` and ``instead``: the
    strategy named in the message and the alternative it offers)."""
    layers = moe_layers(module)
    config = getattr(module, "config", None)
    if not layers:
        detail = (
            f" (model.config.first_k_dense_replace {config.first_k_dense_replace} >= num_hidden_layers "
            f"{config.num_hidden_layers})"
            if config is not None and hasattr(config, "first_k_dense_replace")
            else ""
        )
        raise ValueError(
            f"{strategy} shards MoE layers, but the model has none{detail}: lower "
            f"model.config.first_k_dense_replace, or {instead}"
        )
    for name, moe in layers:
        num_experts = moe.experts.num_experts
        if num_experts % expert_parallel_size:
            raise ValueError(
                f"model.config.n_routed_experts ({num_experts}, layer {name}) must be divisible by "
                f"{KEY}.expert_parallel_size ({expert_parallel_size}): change one of them"
            )


__all__ = ["ExpertParallelStrategy", "check_model"]
