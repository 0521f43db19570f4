"""DualPipeStrategy: pipeline parallelism (DualPipe, DualPipeV, 1F1B, ZB1P) as a Lightning strategy.

    trainer:
      devices: 2
      strategy:
        class_path: dsv3_lightning.plugins.dualpipe.DualPipeStrategy
        init_args: {pipeline_parallel_size: 2, num_microbatches: 4, schedule: dualpipev}

One process per pipeline rank (``devices x num_nodes == pipeline_parallel_size``); every rank reads
the same batch, cut into ``num_microbatches``. The strategy is DDP's process handling (launch,
process group, barrier, reduce) without the DDP wrapper, and replaces the step:

- ``training_step`` runs the whole schedule (PipelineRunner: forward and backward of every
  micro-batch, gradients of shared parameters summed), logs ``train/loss``, ``train/ce`` and the
  heads' logs (equal on every rank, from the last stages), and sets the computed gradients aside:
  Lightning zeroes gradients between ``training_step`` and ``backward``;
- ``backward`` puts them back instead of differentiating, and clips by the *global* norm over all
  pipeline ranks when ``gradient_clip_algorithm`` is "norm" (Lightning's own clipping, which sees
  one rank's gradients, then finds nothing to clip);
- ``validation_step`` / ``test_step`` run a forward through the pieces (evaluation.py);
- checkpoints hold the full model: ``lightning_module_state_dict`` broadcasts each tensor from the
  rank that trains it, ``optimizer_state`` gathers each parameter's state from that rank. A
  checkpoint is therefore an ordinary single-process checkpoint, loadable with any number of stages.

A checkpoint loads into the whole module on every rank (before training starts, so loading is the
plain one); at ``on_train_start`` each rank releases the parameters (and optimizer state) of the pieces
it does not run, keeping each Parameter as an empty tensor that the optimizer skips (it never has a
gradient), and ``on_train_end`` fills them again from their owners. Not supported yet, each
refused with the fix: loss terms registered by callbacks (sequence-wise balance loss), gradient
accumulation (the micro-batches are the accumulation), data parallelism beside the pipeline, expert
parallelism (``expert_parallel_size``), ``predict``. Callbacks that read every router's last forward
(ExpertLoadMonitor) see only the local stages' routers and the last micro-batch: leave them out.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from dsv3_lightning.plugins.dualpipe.evaluation import pipeline_evaluate
from dsv3_lightning.plugins.dualpipe.plans import SchedulePlan, build_plan, validate
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

_KEY = "trainer.strategy.init_args"
log = logging.getLogger(__name__)


class DualPipeStrategy(DDPStrategy):
    """Pipeline-parallel training with a DualPipe-family schedule.

    Args:
        pipeline_parallel_size: Pipeline ranks; must equal ``trainer.devices x trainer.num_nodes``.
        num_microbatches: Micro-batches per optimizer step; ``data.batch_size`` must be a multiple.
        schedule: "dualpipev" (DeepSeek's V-shaped DualPipe, 2 stages per rank), "dualpipe" (the
            bidirectional original, every stage on two ranks), "1f1b" or "zb" (baselines).
        expert_parallel_size: Expert parallelism inside the pipeline (a pipeline x expert x data
            mesh); only 1 is supported yet.
        start_method: How the processes start: "popen" (re-run the command, as ``dsv3 fit``), "spawn"
            or "fork" (in-process launch, for notebooks and tests).
    """

    strategy_name = "dualpipe"

    def __init__(
        self,
        pipeline_parallel_size: int,
        num_microbatches: int,
        schedule: Literal["dualpipev", "dualpipe", "1f1b", "zb"] = "dualpipev",
        *,
        expert_parallel_size: int = 1,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        validate(schedule, pipeline_parallel_size, num_microbatches)
        if expert_parallel_size != 1:
            raise NotImplementedError(
                f"{_KEY}.expert_parallel_size ({expert_parallel_size}) > 1: the pipeline x expert x data mesh is "
                "not implemented yet; set it to 1 (pipeline only), or train with ExpertParallelStrategy "
                "(dsv3_lightning.plugins.expert_parallel) without pipeline parallelism"
            )
        super().__init__(start_method=start_method, **kwargs)
        self.pipeline_parallel_size = pipeline_parallel_size
        self.num_microbatches = num_microbatches
        self.schedule = schedule
        self.runner: PipelineRunner | None = None
        self._grads: dict[torch.nn.Parameter, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup
    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": 1, "rank": 0}  # every pipeline rank reads the same batch

    @override
    def configure_ddp(self) -> None:
        pass  # no DDP wrapper: the pipeline owns the gradients

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        world = self.num_nodes * self.num_processes
        if world != self.pipeline_parallel_size:
            raise ValueError(
                f"{_KEY}.pipeline_parallel_size ({self.pipeline_parallel_size}) must equal trainer.devices x "
                f"trainer.num_nodes ({world}): data parallelism beside the pipeline is not supported yet; set "
                f"trainer.devices to {self.pipeline_parallel_size}"
            )
        if trainer.accumulate_grad_batches != 1:
            raise NotImplementedError(
                f"trainer.accumulate_grad_batches ({trainer.accumulate_grad_batches}) is not supported with "
                f"{type(self).__name__}: the micro-batches are the accumulation; raise {_KEY}.num_microbatches "
                "and data.batch_size instead"
            )
        module = trainer.lightning_module
        terms = sorted(getattr(module, "_loss_terms", {}))
        if terms:
            raise NotImplementedError(
                f"loss terms {terms} (added by callbacks such as SequenceBalanceLoss) need every layer's router "
                f"statistics at the loss, which a pipeline spreads over ranks; remove those callbacks from "
                f"trainer.callbacks with {type(self).__name__}"
            )
        super().setup(trainer)
        self.runner = PipelineRunner(module, self.build_plan(), dist.group.WORLD, self.root_device)

    def build_plan(self) -> SchedulePlan:
        """The extension point for another schedule: every pipeline rank's compute actions.

        The default is the named schedule's plan (plans.py). A subclass may return any
        ``SchedulePlan`` on a linear layout (one stage per rank) whose action lists are valid for
        torch.distributed.pipelining's runtime (it adds the sends and receives): it then runs, logs and
        checkpoints like the built-in schedules, and ``simulate`` reports its bubble and memory.
        """
        return build_plan(self.schedule, self.pipeline_parallel_size, self.num_microbatches)

    def _runner(self) -> PipelineRunner:
        if self.runner is None:
            raise RuntimeError(
                f"{type(self).__name__} has no pipeline before Trainer setup (no process group yet)"
            )
        return self.runner

    # ------------------------------------------------------------------ training
    @override
    def training_step(self, tokens: torch.Tensor, batch_idx: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        runner = self._runner()
        module = self.lightning_module
        module.zero_grad(
            set_to_none=True
        )  # Lightning zeroes only after training_step; the schedule adds to .grad
        with self.precision_plugin.train_step_context():
            loss, logs = runner.train_step(tokens)
        # Lightning zeroes gradients between training_step and backward: keep them aside until backward
        self._grads = {p: p.grad for p in module.parameters() if p.grad is not None}
        for p in self._grads:
            p.grad = None
        device = tokens.device
        module.log("train/loss", loss.to(device), prog_bar=True)
        module.log_dict({f"train/{k}": v.to(device) for k, v in logs.items()})
        seq_len = tokens.shape[1] - 1 - module.extra_tokens
        module.flops_per_batch = module.flops_per_token * tokens.shape[0] * seq_len
        return loss.to(device).requires_grad_()

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        for p, grad in self._grads.items():
            p.grad = grad if p.grad is None else p.grad + grad
        self._grads = {}
        trainer = module.trainer
        if trainer.gradient_clip_val and (trainer.gradient_clip_algorithm or "norm") == "norm":
            self.clip_global_norm(float(trainer.gradient_clip_val))
        return self.precision_plugin.post_backward(closure_loss, module)

    def clip_global_norm(self, max_norm: float) -> float:
        """Scales every rank's gradients so that the norm over the whole model is at most ``max_norm``.

        Each parameter counts once, on the lowest rank that trains it. Returns the norm before clipping.
        """
        runner = self._runner()
        module = self.lightning_module
        sq = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for name, p in module.named_parameters():
            owners = runner.owners.get(name, ())
            if p.grad is not None and owners and min(owners) == runner.rank:
                sq += p.grad.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=runner.group)
        norm = math.sqrt(sq.item())
        scale = max_norm / (norm + 1e-6)
        if scale < 1:
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, tokens: torch.Tensor, stage_name: str) -> None:
        logs = pipeline_evaluate(self._runner(), tokens, stage_name)
        self.lightning_module.log_dict({k: v.to(tokens.device) for k, v in logs.items()})

    @override
    def validation_step(self, tokens: torch.Tensor, batch_idx: int, *args: Any, **kwargs: Any) -> None:
        with self.precision_plugin.val_step_context():
            self._evaluate(tokens, "val")

    @override
    def test_step(self, tokens: torch.Tensor, batch_idx: int, *args: Any, **kwargs: Any) -> None:
        with self.precision_plugin.test_step_context():
            self._evaluate(tokens, "test")

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"predict is not supported with {type(self).__name__}; predict with a single device (trainer.devices: 1 "
            "and the default strategy), loading the checkpoint, which holds the full model"
        )

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.runner is None:
            return super().lightning_module_state_dict()
        return self.runner.full_state_dict()

    @override
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer's state dict with each parameter's state taken from the rank that trains it."""
        state = super().optimizer_state(optimizer)
        if self.runner is None or not state:
            return state
        runner = self.runner
        module = self.lightning_module
        opt = getattr(optimizer, "_optimizer", optimizer)
        names = {id(p): n for n, p in module.named_parameters()}
        params = [p for group in opt.param_groups for p in group["params"]]
        mine = {
            i: state["state"][i]
            for i, p in enumerate(params)
            if i in state["state"] and min(runner.owners.get(names[id(p)], {0})) == runner.rank
        }
        gathered: list = [None] * dist.get_world_size(runner.group)
        dist.all_gather_object(
            gathered,
            {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in mine.items()},
            group=runner.group,
        )
        full = {}
        for part in gathered:
            full.update(part)
        return {**state, "state": dict(sorted(full.items()))}

    @override
    def on_train_start(self) -> None:
        """Each rank gives back the parameters (and their optimizer state) of the pieces it does not run."""
        super().on_train_start()
        runner = self._runner()
        kept = runner.release_unowned()
        names = {id(p): n for n, p in self.lightning_module.named_parameters()}
        for optimizer in self.optimizers:
            for p in list(optimizer.state):
                if names.get(id(p)) in runner.released:
                    del optimizer.state[p]
        total = sum(
            s.numel()
            for n, s in runner.full_shapes.items()
            if n in dict(self.lightning_module.named_parameters())
        )
        log.info(
            f"pipeline rank {runner.rank}: holds {kept}/{total} parameters ({len(runner.released)} tensors released)"
        )

    @override
    def on_train_end(self) -> None:
        """Completes every rank's copy of the module again, so that what the launcher hands back to a
        notebook's process after ``fit`` (rank 0's module) is the whole trained model."""
        super().on_train_end()
        if self.runner is not None:
            self.runner.restore_unowned()

    @override
    def teardown(self) -> None:
        self.runner = None
        super().teardown()


__all__ = ["DualPipeStrategy"]
