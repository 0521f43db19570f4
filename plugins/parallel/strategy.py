"""ParallelStrategy: the lifecycle every parallel strategy shares; ExpertParallelStrategy and
DualPipeStrategy are thin layers on it.

    launch          DDP's process handling (popen / spawn / fork, process group, barrier, ``reduce``
                    over the world, so that the balancing callbacks' counts cover the global batch)
                    without the DDP wrapper, which would average expert gradients over ranks that hold
                    different experts
    mesh            one pipeline x data x expert DeviceMesh (mesh.py), built once
    shard-first     a module built on the meta device (``dsv3 fit``: ``builds_shards_first``) is cut in
                    ``model_sharded_context`` and ``configure_model`` materialises only this rank's
                    share, initialised by name to the values one process gives it
    expert shards   every MoE layer's routed experts (the model's and the MTP heads') split over "ep"
                    (expert_parallel/sharding.py), each layer's dispatcher an all-to-all over it built
                    by ``make_dispatcher`` (FP8 dispatch, node-limited routing: options here)
    sampler         replica r = d·E + e of the E·D reads slice r of the global batch (the P ranks of a
                    pipeline read the same slice)
    gradients       one synchronisation (grad_sync.py): the global batch's gradient, clipped by the
                    whole model's norm when ``trainer.gradient_clip_val`` is set with the "norm"
                    algorithm (Lightning's own clipping then finds nothing left to clip); ``zero1``:
                    the optimizer state sharded over data parallelism (zero.py)
    checkpoints     sharded (checkpoint.py): each rank writes and reads its own share, so a checkpoint
                    resumes on any mesh and in a plain run; ``checkpoint_format: full`` gathers one
                    ordinary file (expert shards gathered on save, sliced on load)
    end             a module built with values has its shards gathered back after a normal end, so that
                    it is a plain model again; one built shard-first never holds more than its share;
                    after an exception, no collective (the other ranks may be gone)

A subclass says where its step calls ``sync_gradients`` and, for a pipeline, which positions use each
parameter (``parameter_owners``) and how the full module state is read (``full_module_state``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.node_limited import apply_node_limit, node_groups
from dsv3_lightning.plugins.expert_parallel.two_hop import check_ranks_per_node
from dsv3_lightning.plugins.expert_parallel.sharding import (
    ExpertShard,
    full_optimizer_state,
    full_state_dict,
    local_state_dict,
    moe_layers,
    sliced_optimizer_states,
    unshard_experts,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dsv3_lightning.model.materialize import has_meta_tensors
from dsv3_lightning.sharded_checkpoint import looks_sharded, save
from dsv3_lightning.sharded_checkpoint_io import OPTIMIZER_STATES, ShardedCheckpointIO, lightning_entries

from dsv3_lightning.plugins.parallel.checkpoint import (
    LOADED,
    RankShare,
    apply_optimizer_state,
    load_sharded,
    restore_hyperparameters,
    zero_state_from_full,
)
from dsv3_lightning.plugins.parallel.grad_sync import GradientSync
from dsv3_lightning.plugins.parallel.mesh import KEY, ParallelMesh, mesh_shape
from dsv3_lightning.plugins.parallel.zero import Zero1


class _ShareLauncher(_MultiProcessingLauncher):
    """The in-process launcher (spawn, fork), which hands rank 0's weights back to the calling process,
    except after a shard-first run: rank 0 holds only its share (the trained model is the checkpoint)."""

    @override
    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any):
        output = super()._collect_rank_zero_results(trainer, results)
        if output is not None and output.weights_path is not None and self._strategy.shards_first:
            self._strategy.checkpoint_io.remove_checkpoint(output.weights_path)
            output = output._replace(weights_path=None)
        return output


class ParallelStrategy(DDPStrategy):
    """A pipeline x data x expert parallel run (see the module docstring for what it owns).

    Args:
        expert_parallel_size: Ranks that share one copy of the routed experts, exchanging tokens by
            all-to-all; ``model.config.n_routed_experts`` must be a multiple. The rest of
            ``trainer.devices x trainer.num_nodes`` is data parallelism.
        max_nodes_per_token: Node-limited routing: each token's experts on at most this many nodes
            (DeepSeek-V3: 4). It sets every router's ``n_group`` / ``topk_group`` to the nodes and M
            (node_limited.py), or checks that the model's already are. None leaves routing as configured.
        ranks_per_node: Expert ranks per node (consecutive ranks; must divide expert_parallel_size, or be
            a multiple of it). Node-limited routing's nodes (unset: ``trainer.devices``). When set and it
            cuts an expert group into several nodes (1 < ranks_per_node < expert_parallel_size), tokens
            are dispatched in two hops as DeepSeek-V3: once to each node, then inside it
            (expert_parallel/two_hop.py); unset, or 1, or >= expert_parallel_size: one all-to-all.
        fp8_dispatch: Send the dispatched activations as 1x128-tile FP8 (E4M3) with float32 scales,
            as DeepSeek-V3 does; combine and all gradients stay in the activations' dtype.
        zero1: Shard the optimizer state and float32 master weights over data parallelism, as
            DeepSeek-V3 (ZeRO-1, zero.py): replicated parameters' over the E·D ranks of their pipeline
            position, expert shards' over the D ranks of their data group; gradients reduce-scattered
            in buckets, parameters all-gathered after the step.
        checkpoint_format: "sharded" (each rank writes its own shard with torch.distributed.checkpoint
            into a checkpoint directory; any mesh, or one process, resumes from it: checkpoint.py) or
            "full" (the whole model and optimizer state gathered into one ordinary file by rank 0; not
            with zero1).
        timeout: Seconds a collective may wait before the run fails with a clear error.
        start_method: "popen" (re-run the command, as ``dsv3 fit``), "spawn" or "fork" (in-process
            launch: notebooks and tests).
    """

    pipeline_parallel_size = 1
    """Pipeline positions (a pipeline strategy sets its own)."""

    def __init__(
        self,
        *,
        expert_parallel_size: int = 1,
        max_nodes_per_token: int | None = None,
        ranks_per_node: int | None = None,
        fp8_dispatch: bool = False,
        zero1: bool = False,
        checkpoint_format: Literal["sharded", "full"] = "sharded",
        timeout: float = 1800.0,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        if checkpoint_format not in ("sharded", "full"):
            raise ValueError(f"{KEY}.checkpoint_format ({checkpoint_format!r}) must be 'sharded' or 'full'")
        if zero1 and checkpoint_format == "full":
            raise ValueError(
                f"{KEY}.checkpoint_format 'full' gathers every optimizer state onto one rank, which "
                f"{KEY}.zero1 exists to avoid: use checkpoint_format 'sharded' (the default) with zero1"
            )
        if expert_parallel_size < 1:
            raise ValueError(f"{KEY}.expert_parallel_size ({expert_parallel_size}) must be >= 1")
        if timeout <= 0:
            raise ValueError(f"{KEY}.timeout ({timeout}) must be a positive number of seconds")
        if max_nodes_per_token is not None and max_nodes_per_token < 1:
            raise ValueError(f"{KEY}.max_nodes_per_token ({max_nodes_per_token}) must be >= 1 (or null: off)")
        if ranks_per_node is not None:
            check_ranks_per_node(expert_parallel_size, ranks_per_node)
        kwargs.setdefault("checkpoint_io", ShardedCheckpointIO())  # reads both formats, removes directories
        super().__init__(start_method=start_method, timeout=timedelta(seconds=timeout), **kwargs)
        self.expert_parallel_size = expert_parallel_size
        self.max_nodes_per_token = max_nodes_per_token
        self.ranks_per_node = ranks_per_node
        self.fp8_dispatch = fp8_dispatch
        self.zero1 = zero1
        self.checkpoint_format = checkpoint_format
        self.timeout_s = float(timeout)
        self._mesh: ParallelMesh | None = None
        self._shards: list[ExpertShard] = []
        self._grad_sync: GradientSync | None = None
        self._share: RankShare | None = None
        self._failed = False
        self._meta_names: dict[int, str] = {}
        self.shards_first = False
        """Whether the module was built on meta and cut before it had values (``model_sharded_context``):
        then no rank ever holds more than its share, and nothing is gathered back at the end."""

    # ------------------------------------------------------------------ checks before launch
    @override
    def set_world_ranks(self) -> None:
        super().set_world_ranks()
        mesh_shape(self.num_nodes * self.num_processes, self.pipeline_parallel_size, self.expert_parallel_size)

    @override
    def connect(self, model: pl.LightningModule) -> None:
        if self.expert_parallel_size > 1:
            self.check_model(model)
        super().connect(model)

    def check_model(self, module: torch.nn.Module) -> None:
        """Clear errors for models expert parallelism cannot split."""
        check_model(
            module,
            self.expert_parallel_size,
            strategy=f"{type(self).__name__} with {KEY}.expert_parallel_size {self.expert_parallel_size}",
            instead=f"set {KEY}.expert_parallel_size to 1",
        )

    # ------------------------------------------------------------------ the mesh and the shards
    @property
    def mesh(self) -> ParallelMesh:
        if self._mesh is None:
            raise RuntimeError(f"{type(self).__name__}.mesh exists only after Trainer setup (no process group yet)")
        return self._mesh

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Replica r of the E·D reads slice r; the P ranks of a pipeline read the same slice."""
        replicas = self.num_nodes * self.num_processes // self.pipeline_parallel_size
        return {"num_replicas": replicas, "rank": self.global_rank % replicas}

    def make_dispatcher(self, name: str, num_experts: int) -> AllToAllTokenDispatcher:
        """The token dispatcher of MoE layer ``name`` (override for another dispatch): two hops when
        ``ranks_per_node`` was set and cuts the expert group into nodes (never from the default)."""
        return self.mesh.dispatcher(name, num_experts, fp8=self.fp8_dispatch, ranks_per_node=self.ranks_per_node)

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):
            self._launcher = _ShareLauncher(self, start_method=self._start_method)

    builds_shards_first = True
    """The CLI builds the module on the meta device for this strategy, which cuts it before it has values."""

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        """Around the module's ``configure_model``: a module built on meta is cut here, into this rank's
        expert shard and pipeline pieces, so that ``configure_model`` materialises only those."""
        module = self.lightning_module
        if module is not None and has_meta_tensors(module):
            self._meta_names = {id(p): name for name, p in module.named_parameters()}  # before any is replaced
            self._cut(built_on_meta=True)
        yield

    def _cut(self, *, built_on_meta: bool = False) -> None:
        """The mesh, this rank's expert shards and pipeline pieces (once, before the optimizers exist).

        A module built on meta has no values yet: every rank will initialise its own share by name
        from one seed (rank 0's, broadcast: a run without ``seed_everything`` draws one per process),
        the values a single process would give it. A module built with values (outside the CLI) is
        broadcast from rank 0 instead, as DDP's wrapper would.
        """
        if self._mesh is not None:
            return
        module = self.lightning_module
        self.shards_first = built_on_meta
        if built_on_meta:
            seed = torch.tensor([module.model.init_seed], dtype=torch.int64, device=self.root_device)
            dist.broadcast(seed, src=0)
            module.model.init_seed = int(seed.item())  # once per run, before any value exists
        else:
            _sync_module_states(module)
        self._mesh = mesh = ParallelMesh.create(
            self.pipeline_parallel_size, self.expert_parallel_size, self.timeout_s, self.root_device.type
        )
        self._shards = mesh.shard_experts(module, self.make_dispatcher)
        report = (
            f"{self.strategy_name}: {mesh.pipeline_parallel_size} pipeline x {mesh.data_parallel_size} data x "
            f"{mesh.expert_parallel_size} expert ranks"
        )
        if self._shards:
            report += (
                f"; {len(self._shards)} MoE layer(s), {self._shards[0].num_local_experts} of "
                f"{self._shards[0].num_experts} experts per rank"
            )
        if self.max_nodes_per_token is not None:
            nodes = node_groups(mesh.expert_parallel_size, self.ranks_per_node or self.num_processes)
            routers = [moe.gate for _, moe in moe_layers(module)]
            report += "; " + apply_node_limit(routers, self.max_nodes_per_token, nodes)
        rank_zero_info(report + ("; built shard-first" if built_on_meta else ""))
        self.setup_pipeline()

    @override
    def configure_ddp(self) -> None:
        """No DDP wrapper: gradients are synchronised by ``sync_gradients``."""

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Lightning's ``Strategy.setup`` without DDP's: no wrapper, and no broadcast of the module
        (each rank holds its own share)."""
        if trainer.gradient_clip_val and getattr(self.precision_plugin, "scaler", None) is not None:
            raise NotImplementedError(
                f"trainer.gradient_clip_val ({trainer.gradient_clip_val}) with trainer.precision "
                f"({trainer.precision}) is not supported by {type(self).__name__}: the gradient scaler unscales after "
                "this strategy clips; use precision bf16-mixed or 32, or no clipping"
            )
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._cut()  # a module built with values is cut here (one built on meta already was)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
            self._repoint_optimizers()
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
        if self.zero1 and fitting:
            for i, optimizer in enumerate(self.optimizers):
                self.share.remember(i, optimizer)  # the names a checkpoint maps state by, before re-pointing
            self.grad_sync.shard_optimizers(self.optimizers)

    def _repoint_optimizers(self) -> None:
        """An optimizer made before materialisation holds the meta Parameters that materialisation
        replaced (LightningCLI instantiates ``optimizer:`` with the module's parameters when it parses
        the config): point it at the live ones, by name."""
        if not self._meta_names:
            return
        live = dict(self.lightning_module.named_parameters())
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [
                    live[self._meta_names[id(p)]] if p.is_meta and id(p) in self._meta_names else p
                    for p in group["params"]
                ]
            stale = [p for g in optimizer.param_groups for p in g["params"] if p.is_meta]
            if stale:
                raise RuntimeError(f"{type(optimizer).__name__} holds {len(stale)} parameter(s) still on meta")
        self._meta_names = {}

    def setup_pipeline(self) -> None:
        """After the mesh and the shards, before materialisation: a pipeline's runner (its pieces, and what
        this position holds)."""

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # a sharded checkpoint loads into the shards (and ZeRO-1's ranges) setup made

    # ------------------------------------------------------------------ gradients
    def parameter_owners(self) -> dict[str, set[int]] | None:
        """Parameter name -> the pipeline positions whose pieces use it; None: every parameter is used
        at every position (no pipeline)."""
        return None

    @property
    def grad_sync(self) -> GradientSync:
        if self._grad_sync is None:
            self._grad_sync = GradientSync(
                self.lightning_module, self.mesh, self._shards, self.parameter_owners(), self.root_device
            )
        return self._grad_sync

    @override
    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        result = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.grad_sync.after_step()  # ZeRO-1: the updated shards back into the parameters
        return result

    def sync_gradients(self) -> float | None:
        """Makes every rank's gradients those of the global batch's loss, then clips them by the whole
        model's norm if the trainer asks for it; returns that norm (None when not clipping)."""
        self.grad_sync.reduce()
        trainer = self.lightning_module.trainer
        if trainer.gradient_clip_val and (trainer.gradient_clip_algorithm or "norm") == "norm":
            return self.grad_sync.clip(float(trainer.gradient_clip_val))
        return None

    # ------------------------------------------------------------------ checkpoints
    @property
    def share(self) -> RankShare:
        """What this rank holds of the module and optimizers, as sharded-checkpoint entries."""
        if self._share is None:
            owners = self.parameter_owners()
            state = self.lightning_module.state_dict()
            owned = None
            if owners is not None:
                position = self.mesh.pipeline_rank
                owned = {n for n in state if n not in owners or position in owners[n]}
            self._share = RankShare(self.lightning_module, self._shards, owned, self.grad_sync.counted)
        return self._share

    def _zeros(self) -> dict[int, Zero1]:
        return dict(enumerate(self.grad_sync.zeros)) if self._grad_sync is not None else {}

    def full_module_state(self) -> dict[str, Any]:
        """Every tensor of the module's state dict as this rank holds it (experts: its shard)."""
        return super().lightning_module_state_dict()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.checkpoint_format == "sharded":
            return self.share.model_entries()
        state = self.full_module_state()
        if not self._shards:
            return state
        return full_state_dict(state, self._shards, self._expert_comm("the checkpoint"))

    @override
    def optimizer_state(self, optimizer) -> Any:
        opt = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if self.checkpoint_format == "sharded":
            index = self.optimizers.index(opt)
            return self.share.optimizer_entries(index, opt, self._zeros().get(index))
        return self.full_optimizer_state(opt)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The whole optimizer state dict, as one process would have it (checkpoint_format "full")."""
        state = super().optimizer_state(optimizer)
        if not self._shards or not state:
            return state
        return full_optimizer_state(optimizer, state, self._shards, self._expert_comm("the checkpoint"))

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self.checkpoint_format == "full":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        save(filepath, lightning_entries(checkpoint, checkpoint.get(OPTIMIZER_STATES, [])))

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        if not looks_sharded(checkpoint_path):  # an ordinary file: sliced on load below
            # its hyper-parameters hold a ModelConfig, which torch's default weights-only loading refuses
            return super().load_checkpoint(checkpoint_path, weights_only=bool(weights_only))
        if weights_only:
            raise ValueError(
                f"{checkpoint_path}: a sharded checkpoint's objects hold the module's hyper-parameters "
                "(ModelConfig), which torch's weights-only loading refuses; load it with weights_only False"
            )
        return load_sharded(checkpoint_path, self.share, self.optimizers, self._zeros())

    @override
    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        if checkpoint.get(LOADED):
            return  # load_sharded filled the module's tensors in place
        # an ordinary checkpoint: after setup the experts are sharded, so slice them; a pipeline rank that
        # released what it does not run takes only its own tensors
        state = local_state_dict(checkpoint["state_dict"], self._shards)
        owned = self.share.owned if self.shards_first else None
        if owned is not None:
            missing = sorted(owned - set(state))
            if strict and missing:
                raise KeyError(f"the checkpoint lacks {len(missing)} tensor(s) of this rank's pieces, e.g. {missing[:3]}")
            state = {k: v for k, v in state.items() if k in owned}
        self.lightning_module.load_state_dict(state, strict=strict and owned is None)

    @override
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        zeros = self._zeros()
        if checkpoint.get(LOADED):
            for i, (opt, loaded) in enumerate(zip(self.optimizers, checkpoint[OPTIMIZER_STATES])):
                apply_optimizer_state(i, opt, zeros.get(i), self.share, loaded)
            return
        if zeros:
            for i, (opt, state) in enumerate(zip(self.optimizers, checkpoint[OPTIMIZER_STATES])):
                restore_hyperparameters(opt, state["param_groups"])
                zero_state_from_full(zeros[i], state, self.share.param_names[i])
            return
        if not self._shards:
            return super().load_optimizer_state_dict(checkpoint)
        super().load_optimizer_state_dict(sliced_optimizer_states(checkpoint, self.optimizers, self._shards))

    def _expert_comm(self, where: str):
        return self.mesh.comm(self.mesh.expert_group, where)

    # ------------------------------------------------------------------ end
    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # no collectives in teardown: the other ranks may be gone
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        """Gathers the expert shards back into every rank's module (after a normal end)."""
        if self._shards and not self._failed and not self.shards_first:  # a small model built with values
            unshard_experts(self._shards, self._expert_comm("teardown"))
        self._shards, self._mesh, self._grad_sync, self._share = [], None, None, None
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


__all__ = ["ParallelStrategy", "check_model"]
