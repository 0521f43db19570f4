"""``dsv3 plan``: the command line, the run's settings read from its YAML files, and the checks.

    dsv3 plan --config configs/671B.yaml --pipeline 16 --expert 64 --data 2
    dsv3 plan --config configs/tiny.yaml --config configs/ablations/dualpipe/dualpipev_pp2_ep2.yaml

The YAML files merge as ``dsv3 fit --config`` merges them (later keys win, lists are replaced). The
layout flags default to the config's ``trainer.strategy`` (DualPipeStrategy or ExpertParallelStrategy
init args) and ``trainer.devices x trainer.num_nodes``, else to 1; the micro-batch to
``data.batch_size / num_microbatches`` when the config's DualPipeStrategy splits its batch, else to
``data.batch_size``. Every bad flag is refused by the strategies' own checks, each message prefixed
with the flag and its value and ended with the YAML key it stands for.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dsv3_lightning.config import ModelConfig
from dsv3_lightning.heads import build_head
from dsv3_lightning.module import DSV3LightningModule

log = logging.getLogger(__name__)
_KEY = "trainer.strategy.init_args"
_MODULE_KEYS = (
    "learning_rate",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "betas",
    "recompute_activations",
)
_IGNORED_MODULE_KEYS = ("init_from", "compile_blocks", "nonfinite")
PRECISIONS = {  # trainer.precision -> (parameter dtype, activation dtype), as Lightning's plugins keep them
    "32-true": (torch.float32, torch.float32),
    "32": (torch.float32, torch.float32),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "bf16-true": (torch.bfloat16, torch.bfloat16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "16-mixed": (torch.float32, torch.float16),
    "16": (torch.float32, torch.float16),
    "16-true": (torch.float16, torch.float16),
    "64-true": (torch.float64, torch.float64),
    "64": (torch.float64, torch.float64),
}


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


@dataclass
class RunSettings:
    """What the plan reads from the run's YAML files."""

    paths: list[str]
    model: dict[str, Any]
    data: dict[str, Any]
    trainer: dict[str, Any]
    optimizer: dict[str, Any] | None
    strategy_class: str = ""
    strategy_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, paths: list[str]) -> RunSettings:
        merged: dict[str, Any] = {}
        for path in paths:
            if not Path(path).is_file():
                raise ValueError(f"dsv3 plan --config {path}: no such file")
            merged = merge(merged, yaml.safe_load(Path(path).read_text()) or {})
        trainer = merged.get("trainer") or {}
        strategy = trainer.get("strategy")
        strategy_class, strategy_args = "", {}
        if isinstance(strategy, dict):
            strategy_class = strategy.get("class_path", "").rpartition(".")[2]
            strategy_args = dict(strategy.get("init_args") or {})
        return cls(
            paths,
            merged.get("model") or {},
            merged.get("data") or {},
            trainer,
            merged.get("optimizer"),
            strategy_class,
            strategy_args,
        )

    def model_config(self) -> ModelConfig:
        values = dict(self.model.get("config") or {})
        if "vocab_size" in self.data:  # dsv3 fit links data.vocab_size to model.config.vocab_size
            values["vocab_size"] = self.data["vocab_size"]
        return ModelConfig.from_dict(values, source="model.config")

    def module_kwargs(self) -> dict[str, Any]:
        ignored = sorted(k for k in _IGNORED_MODULE_KEYS if self.model.get(k))
        if ignored:
            warnings.warn(
                f"dsv3 plan: model.{', model.'.join(ignored)} ignored (the plan needs shapes only)",
                stacklevel=2,
            )
        return {k: self.model[k] for k in _MODULE_KEYS if k in self.model}

    def build_module(self, dtype: torch.dtype) -> DSV3LightningModule:
        """The run's LightningModule on the meta device, parameters in ``dtype``."""
        heads = [build_head(copy.deepcopy(h)) for h in self.model.get("heads") or []]
        with torch.device("meta"):
            module = DSV3LightningModule(self.model_config(), heads, **self.module_kwargs())
        return module.to(dtype)

    def make_optimizer(self, module: DSV3LightningModule) -> torch.optim.Optimizer:
        """The run's optimizer: the config's ``optimizer:`` as LightningCLI builds it, else the module's."""
        if self.optimizer:
            import importlib

            module_name, _, name = self.optimizer["class_path"].rpartition(".")
            cls = getattr(importlib.import_module(module_name), name)
            return cls(module.parameters(), **(self.optimizer.get("init_args") or {}))
        module.trainer = _StepsOnly()  # configure_optimizers reads the schedule's length only
        try:
            return module.configure_optimizers()["optimizer"]
        finally:
            module.trainer = None

    def optimizer_name(self) -> str:
        return (
            self.optimizer["class_path"].rpartition(".")[2]
            if self.optimizer
            else "torch.optim.AdamW (the module's)"
        )

    def default(self, name: str, fallback):
        return self.strategy_args.get(name, fallback)

    def devices(self) -> int | None:
        devices, nodes = self.trainer.get("devices"), self.trainer.get("num_nodes", 1)
        return devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None


class _StepsOnly:
    estimated_stepping_batches = 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv3 plan",
        description="Per-rank memory of a pipeline x expert x data layout, from the strategies' own code "
        "run on "
        "the meta device (docs/memory_plan.md).",
    )
    p.add_argument("--config", action="append", required=True, help="the run's YAML file(s), merged in order")
    p.add_argument(
        "--pipeline",
        type=int,
        help="pipeline positions P (trainer.strategy.init_args.pipeline_parallel_size)",
    )
    p.add_argument(
        "--expert", type=int, help="expert-parallel size E (trainer.strategy.init_args.expert_parallel_size)"
    )
    p.add_argument("--data", type=int, help="data-parallel copies D (default: --devices / (P x E), else 1)")
    p.add_argument(
        "--devices", type=int, help="world size (trainer.devices x trainer.num_nodes); must be P x E x D"
    )
    p.add_argument(
        "--schedule", help="pipeline schedule (trainer.strategy.init_args.schedule; default dualpipev)"
    )
    p.add_argument(
        "--microbatches",
        type=int,
        help="micro-batches per step (trainer.strategy.init_args.num_microbatches)",
    )
    p.add_argument("--micro_batch", type=int, help="windows per micro-batch")
    p.add_argument("--seq_len", type=int, help="tokens per window (data.seq_len)")
    p.add_argument(
        "--precision", choices=sorted(PRECISIONS), help="trainer.precision (default: the config's)"
    )
    p.add_argument(
        "--attention",
        choices=("fused", "math"),
        default="fused",
        help="count attention as a GPU's fused kernel keeps it (default) or as the math path "
        "(what a CPU runs for MLA's head dims)",
    )
    return p


@dataclass(frozen=True)
class Layout:
    pipeline: int
    expert: int
    data: int
    schedule: str
    num_microbatches: int
    micro_batch: int
    seq_len: int
    precision: str
    attention: str
    micro_batch_from: str = "--micro_batch"
    """Where the micro-batch size came from, for the header."""

    @property
    def world_size(self) -> int:
        return self.pipeline * self.expert * self.data


def _refuse(flags: str, err: ValueError, meaning: str) -> ValueError:
    return ValueError(f"dsv3 plan {flags}: {err} ({meaning})")


def resolve(args: argparse.Namespace, run: RunSettings) -> Layout:
    """The layout the flags and the config ask for; ValueError naming the flag for a bad one."""
    pipelined = run.strategy_class == "DualPipeStrategy"
    pipeline = _given(args.pipeline, run.default("pipeline_parallel_size", 1) if pipelined else 1)
    expert = _given(args.expert, run.default("expert_parallel_size", 1))
    for flag, value in (("--pipeline", pipeline), ("--expert", expert), ("--data", args.data)):
        if value is not None and value < 1:
            raise ValueError(f"dsv3 plan {flag} {value}: must be >= 1")
    asked = any(v is not None for v in (args.pipeline, args.expert, args.data))
    devices = args.devices or (None if asked else run.devices())  # the config's own layout, unless flags say
    if devices is not None:
        _check_devices(devices, pipeline, expert)
    data = _given(args.data, devices // (pipeline * expert) if devices else 1)
    if args.devices and args.data and args.devices != pipeline * expert * data:
        raise ValueError(
            f"dsv3 plan --devices {args.devices} --data {data}: the world is --pipeline x --expert x --data "
            f"({pipeline} x {expert} x {data} = {pipeline * expert * data}); give --devices or --data, "
            "or make them agree"
        )
    schedule = args.schedule or run.default("schedule", "dualpipev")
    m = _given(args.microbatches, run.default("num_microbatches", 0) or _min_microbatches(schedule, pipeline))
    if pipeline > 1:
        from dsv3_lightning.plugins.dualpipe.plans import validate

        try:
            validate(schedule, pipeline, m)
        except ValueError as err:
            raise _refuse(
                f"--pipeline {pipeline} --schedule {schedule} --microbatches {m}",
                err,
                f"--pipeline, --schedule and --microbatches set {_KEY}.pipeline_parallel_size, schedule, "
                "num_microbatches",
            ) from None
    seq_len = _given(args.seq_len, run.data.get("seq_len"))
    if not seq_len or seq_len < 1:
        raise ValueError(f"dsv3 plan --seq_len {seq_len}: must be >= 1 (default: data.seq_len of the config)")
    micro_batch, source = _micro_batch(args, run, m, pipelined)
    return Layout(
        pipeline,
        expert,
        data,
        schedule,
        m,
        micro_batch,
        seq_len,
        args.precision or str(run.trainer.get("precision") or "32-true"),
        args.attention,
        source,
    )


def _given(value, default):
    return default if value is None else value


def _check_devices(devices: int, pipeline: int, expert: int) -> None:
    from dsv3_lightning.plugins.parallel.mesh import mesh_shape

    try:
        mesh_shape(devices, pipeline, expert)
    except ValueError as err:
        raise _refuse(
            f"--devices {devices} --pipeline {pipeline} --expert {expert}",
            err,
            "--devices is trainer.devices x trainer.num_nodes; --pipeline and --expert those sizes",
        ) from None


def _min_microbatches(schedule: str, pipeline: int) -> int:
    from dsv3_lightning.plugins.dualpipe.plans import SCHEDULES

    known = SCHEDULES.get(schedule)  # an unknown one is refused, naming the flag, by the validation after this
    return (known.min_microbatches_per_rank if known else 1) * max(pipeline, 1)


def _micro_batch(args, run: RunSettings, num_microbatches: int, pipelined: bool) -> tuple[int, str]:
    """(windows per micro-batch, where that came from)."""
    if args.micro_batch is not None:
        if args.micro_batch < 1:
            raise ValueError(f"dsv3 plan --micro_batch {args.micro_batch}: must be >= 1")
        return args.micro_batch, "--micro_batch"
    batch = int(run.data.get("batch_size", 1))
    if not pipelined:  # the config's own run has no pipeline: its batch is one forward
        return batch, "data.batch_size"
    if batch % num_microbatches:
        raise ValueError(
            f"dsv3 plan: data.batch_size ({batch}) is not a multiple of {_KEY}.num_microbatches "
            f"({num_microbatches}); "
            "give --micro_batch, or fix the config"
        )
    return batch // num_microbatches, f"data.batch_size / {_KEY}.num_microbatches"


def check_model(module: DSV3LightningModule, layout: Layout) -> None:
    """The strategies' own checks of the model against the layout (experts, layers, positions)."""
    config = module.config
    if layout.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"dsv3 plan --seq_len {layout.seq_len}: longer than model.config.max_position_embeddings "
            f"({config.max_position_embeddings}); lower --seq_len"
        )
    if layout.pipeline > 1:
        from dsv3_lightning.plugins.dualpipe.partition import split_layers
        from dsv3_lightning.plugins.dualpipe.plans import layout_for

        pieces = layout_for(layout.schedule, layout.pipeline).num_pieces
        try:
            split_layers(config.num_hidden_layers, pieces, schedule=layout.schedule, ranks=layout.pipeline)
        except ValueError as err:
            raise _refuse(
                f"--pipeline {layout.pipeline}", err, f"--pipeline is {_KEY}.pipeline_parallel_size"
            ) from None
    if layout.expert > 1:
        from dsv3_lightning.plugins.expert_parallel.strategy import check_model as check_experts

        strategy = "DualPipeStrategy" if layout.pipeline > 1 else "ExpertParallelStrategy"
        try:
            check_experts(
                module,
                layout.expert,
                strategy=f"{strategy} with {_KEY}.expert_parallel_size {layout.expert}",
                instead="use --expert 1",
            )
        except ValueError as err:
            raise _refuse(
                f"--expert {layout.expert}", err, f"--expert is {_KEY}.expert_parallel_size"
            ) from None


def main(argv: list[str] | None = None) -> None:
    from dsv3_lightning.plugins.plan.build import build_plan_report

    args = parser().parse_args(argv)
    print(build_plan_report(args), end="")


__all__ = ["PRECISIONS", "Layout", "RunSettings", "check_model", "main", "parser", "resolve"]
