"""The plan put together: today's and ZeRO-1's measured rows, the V3 model's, one table per distinct rank.

``plan_positions`` returns every pipeline position's three rows (today, after: ZeRO-1, V3 model);
positions whose rows are equal are then one table ("pipeline ranks 2-15"). Expert and data ranks at
one position are symmetric, so a position stands for its E x D global ranks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from dsv3_lightning.plugins.dualpipe.plans import SchedulePlan, build_plan

from dsv3_lightning.plugins.plan.activations import PieceActivations, peak_activations
from dsv3_lightning.plugins.plan.after import LABEL as AFTER
from dsv3_lightning.plugins.plan.command import PRECISIONS, Layout, RunSettings, check_model, resolve
from dsv3_lightning.plugins.plan.report import Memory, RankPlan, gb, render
from dsv3_lightning.plugins.plan.today import PositionState, clip_value, measure_positions
from dsv3_lightning.plugins.plan.zero1 import zero1_memory


@dataclass(frozen=True)
class PositionPlan:
    state: PositionState
    today: Memory
    after: Memory
    """The same rank under ``zero1: true``, measured (after.py)."""
    v3: Memory


def plan_positions(run: RunSettings, layout: Layout) -> tuple[list[PositionPlan], dict]:
    """(every position's rows, facts about the run for the header)."""
    weight_dtype, compute_dtype = PRECISIONS[layout.precision]
    module = run.build_module(weight_dtype)
    check_model(module, layout)
    total, activated = module.model.num_parameters()
    head_params = sum(p.numel() for p in module.heads.parameters())
    plan = (
        build_plan(layout.schedule, layout.pipeline, layout.num_microbatches) if layout.pipeline > 1 else None
    )
    clip = clip_value(run.trainer.get("gradient_clip_val"), run.trainer.get("gradient_clip_algorithm"))
    states = measure_positions(module, plan, layout.expert, layout.data, run.make_optimizer, clip)

    probe = PieceActivations(
        run.build_module(compute_dtype), layout.micro_batch, layout.seq_len, attention=layout.attention
    )
    v3_probe = (
        probe
        if compute_dtype == torch.bfloat16
        else PieceActivations(
            run.build_module(torch.bfloat16), layout.micro_batch, layout.seq_len, attention=layout.attention
        )
    )
    recompute = bool(run.model.get("recompute_activations"))
    out = []
    for state in states:
        per_mb_today, peak_today = _activations(probe, plan, state, recompute)
        per_mb_v3, peak_v3 = _activations(v3_probe, plan, state, True)
        today = Memory(
            layout="today",
            params=state.params,
            weights=state.weights,
            gradients=state.gradients,
            optimizer_state=state.optimizer_state,
            reduction_buffers=max(state.reduction.values(), default=0),
            activations_per_microbatch=per_mb_today,
            activations=peak_today,
        )
        zero = state.after
        after = Memory(
            layout=AFTER,
            params=state.params,
            weights=zero.weights,
            gradients=zero.gradients,
            master_weights=zero.master_weights,
            optimizer_state=zero.optimizer_state,
            master_gradients=zero.master_gradients,
            reduction_buffers=max(zero.reduction.values(), default=0),
            activations_per_microbatch=per_mb_today,
            activations=peak_today,
        )
        v3 = zero1_memory(
            state.replicated_params,
            state.expert_params,
            layout.expert,
            layout.data,
            activations_per_microbatch=per_mb_v3,
            activations=peak_v3,
        )
        out.append(PositionPlan(state, today, after, v3))
    facts = dict(
        total=total,
        activated=activated,
        head_params=head_params,
        clip=clip,
        weight_dtype=weight_dtype,
        compute_dtype=compute_dtype,
        recompute=recompute,
        moe_layers=sum(map(module.config.is_moe_layer, range(module.config.num_hidden_layers))),
    )
    return out, facts


def _activations(probe: PieceActivations, plan: SchedulePlan | None, state: PositionState, recompute: bool):
    """(one micro-batch through every stage of the position, the schedule's peak) in bytes."""
    by_stage = {
        s: probe.piece_bytes(layers, first, last, recompute=recompute)
        for s, layers, first, last in state.pieces
    }
    per_microbatch = sum(by_stage.values())
    if plan is None:  # no pipeline: one micro-batch's forward and backward at a time
        return per_microbatch, per_microbatch
    return per_microbatch, peak_activations(plan, state.position, by_stage.__getitem__)


def describe(state: PositionState, config) -> str:
    parts = []
    for stage, (start, end), first, last in state.pieces:
        dense = sum(not config.is_moe_layer(i) for i in range(start, end))
        text = (
            f"stage {stage}: layers {start}-{end - 1}" if end - start > 1 else f"stage {stage}: layer {start}"
        )
        kinds = [f"{dense} dense"] * bool(dense) + [f"{end - start - dense} MoE"] * bool(end - start - dense)
        text += f" ({', '.join(kinds)})"
        text += ", embedding" * first + ", norm + lm_head + heads" * last
        parts.append(text)
    return "; ".join(parts)


def group(positions: list[PositionPlan], layout: Layout, config) -> list[RankPlan]:
    groups: dict[tuple, list[PositionPlan]] = {}
    for p in positions:
        groups.setdefault((p.today, p.after, p.v3), []).append(p)
    plans = []
    for (today, after, v3), members in groups.items():
        first = members[0].state
        description = (
            describe(first, config)
            if len(members) == 1
            else f"e.g. rank {first.position}: " + describe(first, config)
        )
        steps = ", ".join(f"{name} {gb(v)}" for name, v in first.reduction.items())
        notes = [
            f"params: {first.replicated_params:,} replicated (over the {layout.expert * layout.data} ranks "
            f"of the position) + {first.expert_params:,} of expert shards (1/{layout.expert} of each MoE "
            f"layer's experts, over the {layout.data} data-parallel rank(s) holding the same shard)",
            f"today's reduction buffers: the largest peak of {steps}"
            if steps
            else "today: no gradient reduction",
            _after_note(first, layout),
            f"V3 model vs after: bf16 weights + fp32 gradients ({gb(v3.weights + v3.gradients)}) against "
            f"the module's dtype for both ({gb(after.weights + after.gradients)}); bf16 moments; the fp32 "
            "gradient buffer reduce-scattered in place (no master gradients, no staging)",
        ]
        plans.append(
            RankPlan(
                positions=[m.state.position for m in members],
                ranks_per_position=layout.expert * layout.data,
                description=description,
                rows=[today, after, v3],
                notes=notes,
            )
        )
    return plans


def _after_note(state: PositionState, layout: Layout) -> str:
    zero = state.after
    groups = " and ".join(f"{label} over {size} ranks" for label, size in zero.shards.items())
    steps = ", ".join(f"{name} {gb(v)}" for name, v in zero.reduction.items())
    return (
        f"after: master weights, optimizer state and master gradients are this rank's shards ({groups}); "
        "the model's full gradients exist until the reduce-scatter stages them, the master gradients "
        "until after_step frees them (the model states count the larger of the two); reduction buffers: "
        f"the largest peak of {steps}, "
        f"the reduce-scatter's above both gradient columns (above the model's gradients it peaks at "
        f"{gb(zero.reduce_scatter_peak)}, master gradients included: its buckets are staged while the "
        f"gradients they copy are freed; Zero1.memory() states two buckets, {gb(zero.documented_buckets)})"
    )


def header(run: RunSettings, layout: Layout, facts: dict) -> list[str]:
    config = " + ".join(run.paths)
    pipeline = (
        f"schedule {layout.schedule}, {layout.num_microbatches} micro-batches"
        if layout.pipeline > 1
        else "no pipeline"
    )
    dtype = str(facts["weight_dtype"]).removeprefix("torch.")
    act = str(facts["compute_dtype"]).removeprefix("torch.")
    clip = f"clip by norm {facts['clip']:g}" if facts["clip"] else "no clipping"
    return [
        f"## Memory plan: {config} on PP{layout.pipeline} x EP{layout.expert} x DP{layout.data} "
        f"({layout.world_size:,} ranks)",
        "",
        f"- model: {facts['total']:,} parameters ({facts['activated']:,} activated per token), "
        f"{facts['head_params']:,} in prediction heads; {facts['moe_layers']} MoE layers",
        f"- {pipeline}; micro-batch {layout.micro_batch} x {layout.seq_len} tokens "
        f"({layout.micro_batch_from}); "
        "trainer.precision "
        f"{layout.precision}; {clip}",
        "- today (measured: the strategies' code on the meta device): weights and gradients "
        f"{dtype}, optimizer "
        f"{run.optimizer_name()}, activations {act} with recompute_activations "
        f"{'on' if facts['recompute'] else 'off'}, attention as "
        f"{'a GPU fused kernel' if layout.attention == 'fused' else 'the math path'} keeps it",
        f"- {AFTER} (measured: the same code with GradientSync.shard_optimizers, one step on meta): "
        f"weights and gradients {dtype}, float32 master weights and gradients and the optimizer's state "
        "sharded over the ranks replicating each parameter, activations as today",
        "- V3 ZeRO-1 model (a model, not code): bf16 weights, fp32 gradients, fp32 master weights + "
        "bf16 moments sharded over the ranks replicating each parameter, reduction in place; "
        "activations measured in bfloat16 with recompute_activations on",
        "- model states = weights + master weights + optimizer state + the larger of gradients and master "
        "gradients (the reduce-scatter frees the one as it fills the other); "
        "peak = model states + max(reduction buffers, activations); GB = 10^9 bytes, MB = 10^6",
    ]


def build_plan_report(args: argparse.Namespace) -> str:
    run = RunSettings.load(args.config)
    layout = resolve(args, run)
    positions, facts = plan_positions(run, layout)
    return render(header(run, layout, facts), group(positions, layout, run.model_config()))


__all__ = ["PositionPlan", "build_plan_report", "group", "plan_positions"]
