"""A schedule simulator: per-rank bubble time and peak activation memory of real action lists.

``simulate(plan, ChunkCosts(F=1, B=2, W=1, FB=2.5))`` replays every rank's action list (plans.py;
the strategy's own lists) in order. An action starts when its rank is free and its inputs exist:

    F(s, m)     after F(prev(s), m)                      (first stage of its chain: at once)
    B/I(s, m)   after B/I(next(s), m)                    (last stage: after its own F(s, m))
    W(s, m)     after I(s, m)
    (F;B)       both of the above; lasts FB ("F&B", a forward and a backward overlapped)

and lasts F, B (a full backward), B - W (the input part I) or W. Communication is free, as in the
paper's table. Since each rank's order is fixed, start times follow from the dependencies alone;
a rank whose next action can never start is a deadlock, reported with the stuck actions.

Per rank: ``busy`` (sum of its action times), ``bubble`` = makespan - busy (the idle time inside the
step, which the paper's table counts), and ``peak_activations``: the most micro-batch activations of
one stage held at once, counted +1 at a forward and -1 when its backward is complete (B, or W after
I), in units of one stage's activations for one micro-batch. For the table's "activation" column
(units of one rank's stage under 1F1B, i.e. 1/PP of the layers), ``activation_units`` rescales by
the layers per stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv3_lightning.plugins.dualpipe.layout import PipelineLayout
from dsv3_lightning.plugins.dualpipe.plans import SchedulePlan
from dsv3_lightning.plugins.dualpipe.torch_pipelining import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    Action,
)


@dataclass(frozen=True, kw_only=True)
class ChunkCosts:
    F: float
    """Forward of one stage on one micro-batch."""
    B: float
    """Full backward (input and weight gradients) of one stage on one micro-batch."""
    W: float
    """The weight-gradient part of B (so the input part I takes B - W)."""
    FB: float | None = None
    """A forward and a backward overlapped ("F&B"); None: F + B (no overlap)."""

    def __post_init__(self) -> None:
        if min(self.F, self.B, self.W) < 0 or self.W > self.B:
            raise ValueError(f"chunk costs must be >= 0 with W <= B, got {self}")

    def of(self, action: Action) -> float:
        kind = action.computation_type
        if kind == FORWARD:
            return self.F
        if kind == FULL_BACKWARD:
            return self.B
        if kind == BACKWARD_INPUT:
            return self.B - self.W
        if kind == BACKWARD_WEIGHT:
            return self.W
        if kind == OVERLAP_F_B:
            return self.F + self.B if self.FB is None else self.FB
        raise ValueError(f"no cost for action {action}")


@dataclass
class RankTimeline:
    busy: float = 0.0
    end: float = 0.0
    bubble: float = 0.0
    peak_activations: int = 0
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    """(start, end, action) in execution order, for drawing."""


@dataclass
class Simulation:
    makespan: float
    ranks: dict[int, RankTimeline]

    @property
    def bubble(self) -> float:
        """The largest per-rank bubble (the paper's number)."""
        return max(r.bubble for r in self.ranks.values())

    @property
    def peak_activations(self) -> int:
        return max(r.peak_activations for r in self.ranks.values())


class ScheduleDeadlock(RuntimeError):
    pass


def _parts(action: Action) -> tuple[Action, ...]:
    return action.sub_actions if action.computation_type == OVERLAP_F_B else (action,)


def _ready_after(part: Action, layout: PipelineLayout, done: dict) -> float | None:
    """When the inputs of ``part`` exist, or None if they do not yet."""
    s, kind, m = part.stage_index, part.computation_type, part.microbatch_index
    if kind == FORWARD:
        prev = layout.prev_stage(s)
        return 0.0 if prev is None else done.get((prev, "F", m))
    if kind in (FULL_BACKWARD, BACKWARD_INPUT):
        nxt = layout.next_stage(s)
        return done.get((s, "F", m)) if nxt is None else done.get((nxt, "I", m))
    if kind == BACKWARD_WEIGHT:
        return done.get((s, "I", m))
    raise ValueError(f"cannot simulate action {part}")


def simulate(plan: SchedulePlan, costs: ChunkCosts) -> Simulation:
    layout, actions = plan.layout, plan.actions
    done: dict[tuple[int, str, int], float] = {}
    pos = {r: 0 for r in actions}
    lines = {r: RankTimeline() for r in actions}
    held = {r: 0 for r in actions}
    remaining = sum(len(a) for a in actions.values())
    while remaining:
        progressed = False
        for rank, todo in actions.items():
            while pos[rank] < len(todo):
                action = todo[pos[rank]]
                readies = [_ready_after(p, layout, done) for p in _parts(action)]
                if any(t is None for t in readies):
                    break
                line = lines[rank]
                start = max([line.end, *readies])
                end = start + costs.of(action)
                for part in _parts(action):
                    kind, key = part.computation_type, (part.stage_index, part.microbatch_index)
                    if kind == FORWARD:
                        done[(key[0], "F", key[1])] = end
                        held[rank] += 1
                        line.peak_activations = max(line.peak_activations, held[rank])
                    elif kind == BACKWARD_INPUT:
                        done[(key[0], "I", key[1])] = end
                    else:  # B frees at once, W frees what its I kept
                        if kind == FULL_BACKWARD:
                            done[(key[0], "I", key[1])] = end
                        held[rank] -= 1
                line.busy += end - start
                line.end = end
                line.spans.append((start, end, str(action)))
                pos[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(a[pos[r]]) for r, a in actions.items() if pos[r] < len(a)}
            raise ScheduleDeadlock(f"schedule {plan.schedule!r} deadlocks; next actions per rank: {stuck}")
    makespan = max(line.end for line in lines.values())
    for line in lines.values():
        line.bubble = makespan - line.busy
    return Simulation(makespan, lines)
