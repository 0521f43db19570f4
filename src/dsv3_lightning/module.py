"""DSV3LightningModule: the DeepSeek-V3 model trained on next-token prediction.

    loss = CE(main head) + Σ heads' losses (MTP ...) + Σ registered loss terms (balance losses ...)

The two extension points are seams, not flags: ``heads`` (``PredictionHead`` modules from YAML) add
losses computed from the final hidden states, and callbacks add per-router terms computed from each
MoE layer's routing statistics with ``register_loss_term``. A term is computed in its router's
forward and reaches the gradient through that layer's output (model/router_losses.py), so it works
wherever the layer runs (a pipeline stage); its value is logged. Nothing here knows a plugin.

Optimisation follows DeepSeek-V3 (SPEC.md §9): AdamW with β = (0.9, 0.95) and weight decay 0.1
(not on norms and the embedding), a linear warm-up then cosine decay to ``min_lr_ratio`` of the peak,
stepped every optimizer step. LightningCLI's ``optimizer:`` and ``lr_scheduler:`` keys replace both.
Gradient clipping is the Trainer's ``gradient_clip_val`` (1.0 in the configs, as V3).

Logged: ``train/loss`` (the total) and ``train/ce`` every step; ``val/loss``, ``val/ppl`` = exp(val/loss)
and ``val/accuracy`` (top-1 next-token) per validation run, through torchmetrics so that they are
exact over the whole split on any number of ranks; ``params/total`` and ``params/activated`` at start.

Fine-tuning on conversations (``data.conversations``): a batch carries a loss mask and the packed
conversations (batch.py). The model attends inside each conversation, every loss and ``val/*`` value
is the mean over the target (answer) tokens of the global batch, and ``train/target_tokens`` /
``train/masked_tokens`` count the global batch's trained and masked positions.

A NaN or infinite loss or gradient stops the run before the optimizer applies it, or skips the step
(``nonfinite``, guard.py); a checkpoint of non-finite weights is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from dsv3_lightning.batch import Batch
from dsv3_lightning.collectives import sum_over_processes
from dsv3_lightning.config import ModelConfig
from dsv3_lightning.guard import NonFiniteGuard, check_state
from dsv3_lightning.heads import PredictionHead, build_head, head_spec
from dsv3_lightning.model import DeepSeekV3
from dsv3_lightning.model.materialize import HFCheckpointSource, has_meta_tensors, materialize_
from dsv3_lightning.model.router import Router
from dsv3_lightning.model.router_losses import RouterLoss, RouterLosses
from dsv3_lightning.model.transformer import DecoderLayer
from dsv3_lightning.trainable import Trainable

log = logging.getLogger(__name__)

_BUILD_ON_META: ContextVar[bool] = ContextVar("dsv3_build_on_meta", default=False)


@contextmanager
def building_on_meta() -> Iterator[None]:
    """Within it, a ``DSV3LightningModule`` builds its model and heads on the meta device (as it does
    under ``torch.device("meta")``), to be cut by a strategy and materialised by ``configure_model``.
    The CLI builds the module so when ``trainer.strategy`` says ``builds_shards_first``; only the
    module's own tensors go to meta, not those of the data module, the callbacks or the strategy."""
    token = _BUILD_ON_META.set(True)
    try:
        yield
    finally:
        _BUILD_ON_META.reset(token)


class DSV3LightningModule(L.LightningModule):
    """Trains a ``DeepSeekV3`` on packed token windows ``[B, seq_len + 1 + extra_tokens]`` (or conversations).

    Args:
        config: The model's shape (``model.config.*`` in YAML; ``vocab_size`` is linked from the data).
        heads: Extra prediction heads whose losses are added, e.g. multi-token prediction.
        learning_rate: Peak learning rate of the default AdamW schedule.
        min_lr_ratio: Final learning rate as a fraction of the peak (cosine decay ends there).
        warmup_steps: Optimizer steps of linear warm-up from 0.
        weight_decay: AdamW weight decay of matrices (norms and the embedding get none).
        betas: AdamW betas; DeepSeek-V3 uses (0.9, 0.95).
        init_from: A Hugging Face checkpoint directory whose weights initialise the model; its
            config.json must describe the same shape as ``config``.
        recompute_activations: Recompute each block's attention-input RMSNorm and MLA up-projections
            in backward instead of storing them (DeepSeek-V3's memory trick; costs extra compute).
        nonfinite: What a NaN or infinite loss or gradient does: stop the run before the optimizer
            applies it (``action: raise``, the default) or skip the step (``action: skip``); see
            ``dsv3_lightning.guard``. A checkpoint of non-finite weights is refused either way.
        compile_blocks: ``torch.compile`` every decoder block's attention block and a dense layer's
            MLP block, norms included (a MoE layer's MLP block stays eager; ``DecoderLayer.compile_blocks``). The first steps then take
            longer (compilation); see docs/training_speed.md for what it gains.
        trainable: What trains: ``freeze`` / ``train`` patterns of parameter names and the routed
            experts' ``expert_lr_scale`` (fine-tuning; ``dsv3_lightning.trainable``).
    """

    def __init__(
        self,
        config: ModelConfig,
        heads: list[PredictionHead] | None = None,
        *,
        learning_rate: float = 3e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        init_from: str | None = None,
        recompute_activations: bool = False,
        compile_blocks: bool = False,
        nonfinite: NonFiniteGuard = NonFiniteGuard(),  # noqa: B008  (copied below: each module its own)
        trainable: Trainable = Trainable(),  # noqa: B008  (copied below)
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"model.learning_rate ({learning_rate}) must be positive")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"model.min_lr_ratio ({min_lr_ratio}) must be in [0, 1]")
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps ({warmup_steps}) must be >= 0")
        if isinstance(config, dict):  # from a checkpoint's hyperparameters
            config = ModelConfig.from_dict(config, source="model.config")
        if isinstance(nonfinite, dict):
            nonfinite = NonFiniteGuard(**nonfinite)
        if isinstance(trainable, dict):
            trainable = Trainable(**trainable)
        heads = [build_head(h) for h in heads or []]
        self.save_hyperparameters(ignore=["heads"])
        self.hparams["heads"] = [head_spec(h) for h in heads]  # so that checkpoints rebuild them
        self.nonfinite = dataclasses.replace(nonfinite)  # a fresh guard: its counters are this run's
        self.hparams["nonfinite"] = self.nonfinite.options()
        self.trainable = dataclasses.replace(trainable)
        self.hparams["trainable"] = self.trainable.options()
        self.config = config
        on_meta = _BUILD_ON_META.get() or torch.get_default_device().type == "meta"
        with torch.device("meta") if on_meta else nullcontext():
            if init_from and on_meta:  # the kept tensors are read when materialised
                _check_shape(init_from, _hf_config(init_from), config)
                self.model = DeepSeekV3(config)
            else:
                self.model = DeepSeekV3.from_pretrained(init_from) if init_from else DeepSeekV3(config)
            if init_from:
                _check_shape(init_from, self.model.config, config)
            self.heads = nn.ModuleList(heads)
            for head in self.heads:
                head.attach(self.model)
        for layer in self.modules():  # the model's blocks and the heads' (MTP modules are blocks)
            if isinstance(layer, DecoderLayer):
                layer.set_recomputation(recompute_activations)
                if compile_blocks:
                    layer.compile_blocks()
        self.router_losses = RouterLosses()
        """The registered loss terms, shared with every router (``register_loss_term``)."""
        with torch.device("cpu"):  # never on meta: a metric's defaults are no module tensors to materialise
            self.val_loss = torchmetrics.MeanMetric()
            self.val_accuracy = torchmetrics.MeanMetric()
        self.trainable_parameters = self.trainable.check(self)
        """(trainable, total) parameters of the whole module under ``model.trainable``."""
        self.num_parameters = total, activated = self.model.num_parameters()
        """(total, activated per token) of the whole model, counted at construction: a strategy may later
        keep only a share of it on this process."""
        self.flops_per_token = 6 * (activated - self.model.model.embed_tokens.weight.numel())
        """Training FLOPs per token, 6·N (activated, without the embedding lookup); attention excluded."""
        self.flops_per_batch = 0

    @classmethod
    def from_hparams(cls, hparams: dict) -> DSV3LightningModule:
        """The module a checkpoint's ``hyper_parameters`` describe (weights not loaded)."""
        return cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})

    # ------------------------------------------------------------------ seams
    @property
    def extra_tokens(self) -> int:
        """Tokens past ``seq_len + 1`` that the heads need in each window."""
        return max((head.extra_tokens for head in self.heads), default=0)

    def register_loss_term(self, name: str, term: RouterLoss) -> None:
        """Adds ``Σ_routers term(stats, router)`` to every training step's loss, logged as ``train/{name}``.

        Called by callbacks (balance losses) in ``setup``. Every router of the model and the heads runs
        ``term`` on its own forward's ``RouterStats`` right after routing, and the result joins the
        gradient through that layer (model/router_losses.py): a step on one process and a pipeline
        schedule get the same gradient, and the logged value is the sum over routers.
        """
        if name in self.router_losses.terms:
            raise ValueError(f"a loss term named {name!r} is already registered")
        self.router_losses.terms[name] = term
        for router in self.routers():
            router.losses = self.router_losses

    def remove_loss_term(self, name: str) -> None:
        self.router_losses.terms.pop(name, None)

    def routers(self) -> list[Router]:
        """The model's routers in layer order, then the heads' (the MTP modules are MoE blocks too)."""
        return [m for part in (self.model, self.heads) for m in part.modules() if isinstance(m, Router)]

    # ------------------------------------------------------------------ steps
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def seq_len_of(self, batch: torch.Tensor | dict[str, torch.Tensor]) -> int:
        """S, the positions the model runs on ``batch``'s windows [B, S + 1 + extra_tokens]; windows too
        short for the heads are refused with the fix (0 for a dict without tokens: ``Batch.read``
        refuses it)."""
        tokens = batch if isinstance(batch, torch.Tensor) else batch.get("tokens")
        if tokens is None:
            return 0
        seq_len = tokens.shape[1] - 1 - self.extra_tokens
        if seq_len < 1:
            raise ValueError(
                f"batch windows of {tokens.shape[1]} tokens are too short for the heads, which need "
                f"{self.extra_tokens} extra token(s): set data.extra_tokens to {self.extra_tokens}"
            )
        return seq_len

    def read_batch(self, batch: torch.Tensor | dict[str, torch.Tensor], batch_idx: int | None = None) -> Batch:
        """A batch of windows (or a conversation batch's dict, batch.py), read for this module's heads:
        with a loss mask, every loss is a share of the global batch's mean over its targets. Training
        batch ``batch_idx`` takes the counts of its whole optimizer step from the data module when it
        has them (``step_counts``: exact under gradient accumulation, no collective); otherwise the
        batch's counts are summed over the processes here (one all-reduce)."""
        seq_len = self.seq_len_of(batch)
        trainer = self._trainer
        replicas = trainer.world_size if trainer else 1
        counts = self._step_counts(batch, batch_idx)
        if counts is not None:
            replicas *= trainer.accumulate_grad_batches
        return Batch.read(
            batch, seq_len, offsets=1 + self.extra_tokens, replicas=replicas, counts=counts,
            sum_over_processes=lambda c: sum_over_processes(trainer, c),
        )  # fmt: skip

    def _step_counts(self, batch, batch_idx: int | None) -> torch.Tensor | None:
        """The global counts of training batch ``batch_idx``'s optimizer step, from the data module."""
        if self._trainer is None or batch_idx is None or isinstance(batch, torch.Tensor) or batch.get("loss_mask") is None:
            return None
        step_counts = getattr(getattr(self._trainer, "datamodule", None), "step_counts", None)
        if step_counts is None:
            if self._trainer.accumulate_grad_batches > 1:
                rank_zero_warn(
                    f"trainer.accumulate_grad_batches is {self._trainer.accumulate_grad_batches} and the data gives "
                    "no step counts (DSV3DataModule.step_counts): each accumulated batch's masked loss is its own "
                    "mean, and the step averages them whatever their target counts"
                )
            return None
        trainer = self._trainer
        counts = step_counts(self.current_epoch, batch_idx, trainer.accumulate_grad_batches, trainer.num_training_batches)
        return None if counts is None else torch.from_numpy(counts)

    def _split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, next-token targets) of plain windows (the pipeline's micro-batches)."""
        batch = self.read_batch(tokens)
        return batch.inputs, batch.targets()

    def batch_loss(
        self, logits: torch.Tensor, hidden: torch.Tensor, batch: Batch | torch.Tensor, *, loss_terms: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step API: a batch's training loss from the model's outputs, and its pieces.

        ``logits`` [B, S, V] and ``hidden`` [B, S, D] (the decoder's outputs before the final norm, which
        the heads read) are the model's for ``batch`` (a ``Batch``, or windows [B, S + 1 + extra_tokens]
        of tokens); a loss mask, when the batch has one, applies to the main head and every head. Returns
        the loss to differentiate (main CE + each head's loss; the registered loss terms are already
        in the graph, attached by their routers) and the detached pieces, named as logged without the
        ``train/`` prefix (``ce``, the heads' logs and, with ``loss_terms``, the terms' values since the
        last forward: ``train_logs`` adds them to the logged total). Every way of training calls it:
        ``training_step`` and a pipeline's last stage (``loss_terms=False``: the terms' values lie on
        every stage's rank, and the pipeline collects them after the schedule), so a change to the loss
        here applies under every strategy.
        """
        if isinstance(batch, torch.Tensor):
            batch = self.read_batch(batch)
        ce = batch.cross_entropy(logits)
        loss, logs = ce, {"ce": ce.detach()}
        for head in self.heads:
            head_out = head(hidden, batch, self.model, stage="train", step=self.global_step)
            loss = loss + head_out.loss
            logs.update({k: v.detach() for k, v in head_out.logs.items()})
        if loss_terms:
            logs.update(self.router_losses.pop(loss.device))
        return loss, logs

    def training_step(self, batch: torch.Tensor | dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = self.read_batch(batch, batch_idx)
        accumulation = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        self.router_losses.scale = 1.0 / accumulation  # Lightning divides the loss by it: so do the terms
        out = self.model(batch.inputs, batch.input_documents)
        loss, logs = self.batch_loss(out.logits, out.hidden_states, batch)
        self.flops_per_batch = self.flops_per_token * batch.inputs.numel()
        if batch.counts is not None:  # already global: the mean over processes of equal values
            logs["target_tokens"] = batch.global_count(1)
            logs["masked_tokens"] = batch.global_count(0) - batch.global_count(1)
        self.log_train({"loss": loss.detach(), **logs})
        return loss

    def log_train(self, sums: dict[str, torch.Tensor], count: float = 1.0) -> torch.Tensor:
        """Logs ``train/{key}`` as the global batch's values, the same on every process: one all-reduce.

        ``sums`` are this process's values summed over the ``count`` equal shares of the batch it computed
        (``loss`` without the loss terms, which are added to it here); the values of all processes and
        their counts are summed in one tensor, on the values' device, and divided. A plain step passes
        its own means (count 1); a pipeline rank its last stages' micro-batch sums (count: how many, 0
        on the other ranks), with the loss terms summed over its layers. Returns the logged total loss.
        """
        keys = list(sums)
        values = [sums[k].detach().to(torch.float64).reshape(()) for k in keys]
        total = torch.stack([*values, values[0].new_tensor(count)])
        total = sum_over_processes(self._trainer, total)
        means = dict(zip(keys, (total[:-1] / total[-1]).float()))
        for name in self.router_losses.terms:
            means["loss"] = means["loss"] + means.get(name, 0.0)
        loss = means.pop("loss")
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in means.items()})
        return loss

    def validation_step(self, batch: torch.Tensor | dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: torch.Tensor | dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: torch.Tensor | dict[str, torch.Tensor], stage: str) -> None:
        batch = self.read_batch(batch)
        targets = batch.targets()
        out = self.model(batch.inputs, batch.input_documents)
        losses = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        weights = batch.target_weights()  # with a loss mask: the mean over the targets alone
        self.val_loss.update(losses, weights)
        self.val_accuracy.update((out.logits.argmax(-1) == targets).float().flatten(), weights)
        for head in self.heads:
            head_out = head(out.hidden_states, batch, self.model, stage=stage, step=self.global_step)
            self.log_dict({f"{stage}/{k}": v for k, v in head_out.logs.items()}, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {
                f"{stage}/loss": loss,
                f"{stage}/ppl": torch.exp(loss),
                f"{stage}/accuracy": self.val_accuracy.compute(),
            },
            prog_bar=stage == "val",
        )
        self.val_loss.reset()
        self.val_accuracy.reset()

    def predict_step(self, batch: torch.Tensor | dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Greedy next-token ids for every position of the windows' inputs."""
        batch = self.read_batch(batch)
        return self.model(batch.inputs, batch.input_documents).logits.argmax(-1)

    # ------------------------------------------------------------------ shard-first construction
    def configure_model(self) -> None:
        """Lightning's hook, inside the strategy's contexts and before ``strategy.setup``: materialises
        what is still on the meta device (after a shards-first strategy has cut it) on the strategy's
        device. Does nothing when nothing is on meta: a module built normally, or a second call."""
        if has_meta_tensors(self):
            trainer = self._trainer
            self.materialize(trainer.strategy.root_device if trainer else torch.get_default_device())
        self.trainable.apply(self)  # on the values this process holds (materialising made new Parameters)

    def materialize(self, device: torch.device | str) -> None:
        """Allocates the model's and the heads' meta tensors on ``device`` and fills them: from
        ``init_from`` where given (only the kept tensors and expert rows are read), else with the values
        a module built normally from the same seed has (``model.init_seed``; model/materialize.py).

        The model and each head are materialised as their own roots, so a head's tensors outside
        decoder blocks are named relative to the head, as when it initialises them in ``attach``.
        New Parameter objects replace the meta ones: take references to parameters after this.
        """
        source = HFCheckpointSource(self.hparams.init_from) if self.hparams.init_from else None
        seed, std = self.model.init_seed, self.config.initializer_range
        done = materialize_(self.model, device, seed, std=std, source=source)
        lacking = self._not_loadable(done.initialised)
        if source is not None and lacking:
            raise ValueError(
                f"model.init_from ({self.hparams.init_from}) lacks {len(lacking)} tensor(s) of the "
                f"model, e.g. {lacking[:3]}; is it a checkpoint of this model.config?"
            )
        for head in self.heads:
            part = materialize_(head, device, seed, std=std, source=source)
            if part.loaded and self._not_loadable(part.initialised):
                raise ValueError(
                    f"model.init_from ({self.hparams.init_from}) holds only part of the "
                    f"{type(head).__name__} head's tensors (none for e.g. {part.initialised[:3]}); train the "
                    "head from scratch by loading a checkpoint without them, or complete it"
                )
        left = [n for n, t in (*self.named_parameters(), *self.named_buffers()) if t.is_meta]
        if left:
            raise NotImplementedError(
                f"{len(left)} tensor(s) of the module stay on the meta device, e.g. {left[:3]}: only the "
                "model and the heads are materialised"
            )
        rank_zero_info(f"materialised the model on {device} ({done})")

    def _not_loadable(self, initialised: list[str]) -> list[str]:
        """The tensors a checkpoint should have held: all but the selection bias of a DeepSeek-V2
        (softmax) checkpoint, which has none (it starts at zero, as hf.py loads it)."""
        softmax = self.config.scoring_func == "softmax"
        return [n for n in initialised if not (softmax and n.endswith("e_score_correction_bias"))]

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self) -> None:
        trainable, total = self.trainable_parameters
        if trainable != total:
            rank_zero_info(
                f"model.trainable: {trainable:,} of {total:,} parameters train ({trainable / total:.1%}), "
                f"{total - trainable:,} frozen"
            )
        for logger in self.loggers:
            logger.log_hyperparams({"trainable_parameters": trainable, "total_parameters": total})
        datamodule = getattr(self.trainer, "datamodule", None)
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None and vocab > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab} tokens but model.config.vocab_size is {self.config.vocab_size}; "
                f"set model.config.vocab_size to at least {vocab}"
            )
        extra = getattr(datamodule, "extra_tokens", None)
        if extra is not None and extra < self.extra_tokens:
            raise ValueError(
                f"data.extra_tokens ({extra}) is too small for the prediction heads, which need "
                f"{self.extra_tokens}: set data.extra_tokens to {self.extra_tokens}"
            )
        total, activated = self.num_parameters
        rank_zero_info(f"DeepSeek-V3 model: {total / 1e6:.2f}M parameters, {activated / 1e6:.2f}M activated per token")
        for logger in self.loggers:
            logger.log_metrics({"params/total": total, "params/activated": activated}, step=0)

    # ------------------------------------------------------------------ the non-finite guard
    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.nonfinite.keep_loss(loss)

    def on_after_backward(self) -> None:
        self.nonfinite.check(self)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.nonfinite.drop_if_skipped(self, optimizer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_state(self.trainer, checkpoint["state_dict"], self.device)
        checkpoint["nonfinite_guard"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite.load_state_dict(checkpoint.get("nonfinite_guard", {}))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay, experts = [], [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if self.trainable.expert_lr_scale != 1 and self.trainable.is_routed_expert(name):
                experts.append(param)  # stacked [E, out, in] matrices: decayed
            else:
                (no_decay if param.dim() < 2 or "embed_tokens" in name else decay).append(param)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if experts:
            lr = hp.learning_rate * self.trainable.expert_lr_scale
            groups.append({"params": experts, "weight_decay": hp.weight_decay, "lr": lr})
        optimizer = torch.optim.AdamW(
            groups,
            lr=hp.learning_rate,
            betas=tuple(hp.betas),
            fused=True,  # one kernel over all parameters: 5-8x faster than foreach on CPU for MoE models
        )
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = warmup_cosine(hp.warmup_steps, total_steps, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _check_shape(init_from: str, found: ModelConfig, config: ModelConfig) -> None:
    """Refuses a checkpoint of another shape than ``model.config``, naming each field that differs."""
    if found == config:
        return
    differ = [
        f"{f.name}: {getattr(found, f.name)!r} in config.json, {getattr(config, f.name)!r} in model.config"
        for f in dataclasses.fields(ModelConfig) if getattr(found, f.name) != getattr(config, f.name)
    ]  # fmt: skip
    raise ValueError(
        f"model.init_from ({init_from}) holds a model of another shape than model.config ({'; '.join(differ)}); "
        "copy its config.json values into model.config"
    )


def _hf_config(path: str) -> ModelConfig:
    from dsv3_lightning.hf import CONFIG_NAME, config_from_hf

    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; a Hugging Face model directory needs a config.json")
    return config_from_hf(json.loads(config_path.read_text()), source=str(config_path))


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate multiplier: linear from 0 over ``warmup_steps``, then cosine to ``min_ratio``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


__all__ = ["DSV3LightningModule", "building_on_meta", "warmup_cosine"]
