"""The plan's rows and tables: one ``Memory`` per layout and rank, printed as markdown.

    model states = weights + master weights + optimizer state + max(gradients, master gradients)
    peak = model states + max(reduction buffers, activations)

The gradient reduction runs after the schedule's last backward, when the activations are freed, so
the two transients never add up; the model states are there throughout. ZeRO-1's reduce-scatter
frees the model's gradients as it fills the master gradients, which ``after_step`` frees (after.py):
the two never coexist, hence the larger of them. Master weights and master
gradients are 0 where a layout keeps none (today: the optimizer steps the parameters themselves).
Bytes print in GB (10^9), or MB (10^6) below 0.1 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True, kw_only=True)
class Memory:
    """One rank's memory under one layout (bytes; ``params`` is a count)."""

    layout: str
    params: int
    weights: int
    gradients: int
    optimizer_state: int
    reduction_buffers: int
    master_weights: int = 0
    """Float32 copies the optimizer steps instead of the parameters (ZeRO-1's shards)."""
    master_gradients: int = 0
    """Float32 gradients of the master weights, beside the model's own."""
    activations_per_microbatch: int
    """One micro-batch through every stage this rank runs."""
    activations: int
    """The schedule's peak: the most micro-batches' activations this rank holds at once."""

    @property
    def in_flight(self) -> float:
        return self.activations / self.activations_per_microbatch if self.activations_per_microbatch else 0.0

    @property
    def model_states(self) -> int:
        """Weights, master weights and optimizer state, and the larger of the two gradients: the model's
        exist from the backward until the reduce-scatter frees them as it fills the master gradients,
        which the step consumes and ``after_step`` frees."""
        gradients = max(self.gradients, self.master_gradients)
        return self.weights + self.master_weights + self.optimizer_state + gradients

    @property
    def total(self) -> int:
        return self.model_states + max(self.reduction_buffers, self.activations)


@dataclass(frozen=True, kw_only=True)
class RankPlan:
    """The pipeline positions whose numbers are equal, and their rows."""

    positions: list[int]
    ranks_per_position: int
    description: str
    """Which stages and layers the positions hold."""
    rows: list[Memory]
    notes: list[str]

    def title(self) -> str:
        first = _ranges(self.positions)
        word = "rank" if len(self.positions) == 1 else "ranks"
        return f"pipeline {word} {first} ({self.ranks_per_position} global ranks each): {self.description}"


def _ranges(values: list[int]) -> str:
    """``[0, 2, 3, 4]`` -> ``"0, 2-4"``."""
    out, start = [], values[0]
    for i, value in enumerate(values):
        following = values[i + 1] if i + 1 < len(values) else None
        if following != value + 1:
            out.append(str(start) if start == value else f"{start}-{value}")
            start = following
    return ", ".join(out)


def gb(value: int) -> str:
    """GB with 2 decimals; MB below 0.1 GB (small models), so that no row reads 0.00."""
    if value == 0:
        return "0"
    return f"{value / GB:.2f} GB" if value >= 0.1 * GB else f"{value / 1e6:.1f} MB"


COLUMNS = (
    "layout",
    "params",
    "weights",
    "gradients",
    "master weights",
    "optimizer state",
    "master gradients",
    "reduction buffers",
    "activations (per micro-batch x in flight)",
    "model states",
    "peak",
)


def table(rows: list[Memory]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for m in rows:
        cells = [
            m.layout,
            f"{m.params:,}",
            gb(m.weights),
            gb(m.gradients),
            gb(m.master_weights),
            gb(m.optimizer_state),
            gb(m.master_gradients),
            gb(m.reduction_buffers),
            f"{gb(m.activations_per_microbatch)} x {m.in_flight:.2f} = {gb(m.activations)}",
            gb(m.model_states),
            gb(m.total),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(header: list[str], plans: list[RankPlan]) -> str:
    out = [*header, ""]
    for plan in plans:
        out += [f"### {plan.title()}", "", table(plan.rows), ""]
        out += [f"- {note}" for note in plan.notes]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


__all__ = ["GB", "Memory", "RankPlan", "gb", "render", "table"]
