"""Our runtime for the two-copy DualPipe: runs ``dualpipe_actions`` lists, point-to-point untagged.

torch.distributed.pipelining's runtime assumes one chain of stages (stage s feeds s + 1, stage 0 is
the first, the last index the last), so it cannot run two pipelines in opposite directions over the
same ranks. This runtime does, for ``bidirectional_layout``: stage s (forward direction, s < N) or
N + s (reverse direction) runs piece s on rank s or N-1-s. It reuses torch's backward split
(``_backward.stage_backward_input`` / ``stage_backward_weight``, what torch's stages use for I and W).
It runs any layout's action lists (layout.py); for ``v_layout`` (DualPipeV's lists, taken from torch)
the hand-over at the bottom of the V, between two stages of one rank, stays on the rank. The runner
uses it for ``dualpipev`` when (F;B) pairs are to be overlapped, which torch's runtime does not do.

Per action, in list order:

    F(s, m)    x = nothing (first stage) or the activation of s-1's rank; y = piece(x, tokens=mb_m);
               y goes to next(s)'s rank, unless s is a chain's last stage (y is the loss)
    B(s, m)    dy = the gradient from next(s)'s rank (last stage: 1/M); full backward; dx to prev(s)'s rank
    I(s, m)    dx only (weight part kept); dx to prev(s)'s rank  (first stage: nothing; all done at W)
    W(s, m)    the kept weight part
    (F;B)      ``overlap(self, F, B)`` (overlap.py): by default the F, then the B; InterleavedOverlap
               runs the chunks in turns (both chunks' inputs are here before the pair starts)

Messages carry no tag: NCCL ignores tags, matches the messages between two ranks in the order they
are posted, and its sends wait (on the GPU) for the peer's receive. So every rank posts its sends and
receives in *exchanges*, each one ``dist.batch_isend_irecv`` (ncclGroupStart/End) waited before the
rank goes on, at points every rank derives from the plan alone (``exchanges``), as DeepSeek's
dualpipe.py does with its ``append_isend/append_irecv`` and ``commit_and_wait``:

    1. time the plan: the simulator (simulator.py) gives each action a start and an end on the
       timeline where communication is free (positive costs; any such timeline works);
    2. a message (an activation or a gradient for another rank) is exchanged at the end time e of the
       action that makes it: the sender's send and the receiver's receive both go into their ranks'
       exchange at e; one rank's messages at e in the order of its action list (a pair: F's, then B's);
    3. a rank runs its actions and its exchanges in time order, an exchange at e before an action
       that starts at e (which may need it), after every action that ends at e.

Why this is correct. *Matching*: between ranks A and B, A's sends are posted in order of (e, A's
list order) and B's receives from A in the same order, so the k-th send meets the k-th receive, the
same message. *No deadlock*, by induction over the exchange times e1 < e2 < ...: when every
exchange before e has completed on every rank, each rank can run its actions up to its exchange at e
(an action before it starts before e, so its inputs were exchanged before e), then posts it; the
peer of each of its operations is in the peer's exchange at e, posted as well; so all exchanges at e
complete. A wait on rank A therefore only ever waits for operations that B posts without waiting for
anything of A's first. The simulator's timeline exists (it proves the lists deadlock-free), so this
holds for every plan it accepts; ``check_exchanges`` replays the exchanges by message matching
alone, stricter than NCCL (a group completes only when all of its operations have met their
peers'), and the tests run it for every schedule, size and micro-batch count they use.

Inside an action nothing is sent or received: its inputs were exchanged before it started (so an
overlapped pair's chunks wait only for their all-to-alls; ``receive_inputs`` checks it), its outputs
are exchanged after it. A message between two stages of one rank (the V's turn) stays on the rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.dualpipe.layout import PipelineLayout
from dsv3_lightning.plugins.dualpipe.overlap import OverlapHook, run_sequentially
from dsv3_lightning.plugins.dualpipe.partition import PipelinePiece
from dsv3_lightning.plugins.dualpipe.plans import SchedulePlan
from dsv3_lightning.plugins.dualpipe.simulator import ChunkCosts, simulate
from dsv3_lightning.plugins.dualpipe.torch_pipelining import stage_backward_input, stage_backward_weight
from dsv3_lightning.plugins.dualpipe.torch_pipelining import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    Action,
)

from dsv3_lightning.batch import Batch

_TIMELINE_COSTS = ChunkCosts(F=1, B=2, W=1, FB=3)
"""Any positive costs give a valid exchange order; these are the paper's proportions."""


@dataclass(frozen=True, order=True)
class Message:
    """An activation (``kind`` 0, into F(stage, mb)) or a gradient (1, into B/I(stage, mb))."""

    kind: int
    stage: int
    """The receiving stage."""
    microbatch: int


@dataclass(frozen=True)
class P2P:
    """One operation of an exchange: send ``message`` to, or receive it from, pipeline rank ``peer``."""

    send: bool
    peer: int
    message: Message


@dataclass(frozen=True)
class Exchange:
    """One ``batch_isend_irecv`` of a rank, posted and waited before its action ``before`` runs
    (``before`` = the number of its actions: after the last)."""

    time: float
    before: int
    ops: tuple[P2P, ...]


def _parts(action: Action) -> tuple[Action, ...]:
    return action.sub_actions if action.computation_type == OVERLAP_F_B else (action,)


def input_of(layout: PipelineLayout, part: Action) -> Message | None:
    """The message an F, B or I starts from (None: tokens, or the loss's own gradient)."""
    stage, mb = part.stage_index, part.microbatch_index
    if part.computation_type == FORWARD and layout.prev_stage(stage) is not None:
        return Message(0, stage, mb)
    if part.computation_type in (FULL_BACKWARD, BACKWARD_INPUT) and layout.next_stage(stage) is not None:
        return Message(1, stage, mb)
    return None


def output_of(layout: PipelineLayout, part: Action) -> Message | None:
    """The message an F, B or I ends with (None: the loss, or the first stage's backward)."""
    stage, mb = part.stage_index, part.microbatch_index
    if part.computation_type == FORWARD and (nxt := layout.next_stage(stage)) is not None:
        return Message(0, nxt, mb)
    if part.computation_type in (FULL_BACKWARD, BACKWARD_INPUT) and (prev := layout.prev_stage(stage)) is not None:
        return Message(1, prev, mb)
    return None


def exchanges(plan: SchedulePlan) -> dict[int, list[Exchange]]:
    """Every rank's exchanges in posting order (module docstring, steps 1-3). Messages within a rank
    (the V's turn) are not in them."""
    layout = plan.layout
    timeline = simulate(plan, _TIMELINE_COSTS)
    ops: dict[int, dict[float, list[P2P]]] = {r: {} for r in plan.actions}
    for rank, actions in plan.actions.items():
        for action, (_, end, _) in zip(actions, timeline.ranks[rank].spans, strict=True):
            for part in _parts(action):
                message = output_of(layout, part)
                to = None if message is None else layout.stage_to_rank[message.stage]
                if to is None or to == rank:
                    continue
                ops[rank].setdefault(end, []).append(P2P(True, to, message))
                ops[to].setdefault(end, []).append(P2P(False, rank, message))
    out: dict[int, list[Exchange]] = {}
    for rank, by_time in ops.items():
        starts = [start for start, _, _ in timeline.ranks[rank].spans]
        out[rank] = [
            # before the first action starting at or after t (one ending at t started before it)
            Exchange(t, next((i for i, s in enumerate(starts) if s >= t), len(starts)), tuple(by_time[t]))
            for t in sorted(by_time)
        ]
    return out


def check_exchanges(plan: SchedulePlan, posted: dict[int, list[Exchange]] | None = None) -> None:
    """Replays ``posted`` (default: ``exchanges(plan)``) by message matching alone: each rank posts its
    exchanges in order, the next once every operation of the last has met its peer's (first send from A
    to B meets the first receive on B from A); raises AssertionError if two operations that meet carry
    different messages, if an exchange can never complete (a deadlock), or if an action would run
    before its input is exchanged."""
    posted = exchanges(plan) if posted is None else posted
    layout = plan.layout
    for rank, actions in plan.actions.items():
        arrived = {op.message: ex.before for ex in posted[rank] for op in ex.ops if not op.send}
        for i, action in enumerate(actions):
            for part in _parts(action):
                message = input_of(layout, part)
                sender = None if message is None else layout.stage_to_rank[
                    layout.prev_stage(message.stage) if message.kind == 0 else layout.next_stage(message.stage)
                ]
                if sender is not None and sender != rank:
                    assert arrived.get(message, i + 1) <= i, f"rank {rank}: {part} runs before {message} arrives"
    position = {r: 0 for r in posted}
    waiting: dict[int, int] = {r: 0 for r in posted}  # operations of the current exchange not yet matched
    channels: dict[tuple[int, int, bool], list[tuple[int, Message]]] = {}
    progressed = True
    while progressed:
        progressed = False
        for rank, todo in posted.items():
            if waiting[rank] == 0 and position[rank] < len(todo):
                for op in todo[position[rank]].ops:
                    key = (rank, op.peer, True) if op.send else (op.peer, rank, False)
                    channels.setdefault(key, []).append((rank, op.message))
                waiting[rank] = len(todo[position[rank]].ops)
                position[rank] += 1
                progressed = True
        for (src, dst, is_send), queue in channels.items():
            if not is_send:
                continue
            receives = channels.get((src, dst, False), [])
            while queue and receives:
                (_, sent), (_, got) = queue.pop(0), receives.pop(0)
                assert sent == got, f"rank {src} sends {sent} where rank {dst} receives {got}"
                waiting[src] -= 1
                waiting[dst] -= 1
                progressed = True
    stuck = {r: str(posted[r][position[r] - 1].ops) for r in posted if waiting[r]}
    assert not stuck, f"schedule {plan.schedule!r}: exchanges deadlock; waiting per rank: {stuck}"


@dataclass
class _Chunk:
    x: torch.Tensor | None
    y: torch.Tensor
    dy: torch.Tensor | None = None
    param_groups: list | None = None


class BidirectionalRuntime:
    """Runs this rank's DualPipe actions on ``pieces`` (indexed by piece) over ``group``."""

    def __init__(
        self,
        plan: SchedulePlan,
        pieces: list[PipelinePiece],
        rank: int,
        group: dist.ProcessGroup,
        hidden_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.plan, self.layout, self.pieces, self.rank = plan, plan.layout, pieces, rank
        self.group, self.hidden_shape, self.dtype, self.device = group, hidden_shape, dtype, device
        self.pipeline_order = plan.actions
        self.exchanges = exchanges(plan)[rank]
        """This rank's exchanges in posting order (every rank derives every rank's from the plan)."""
        self._received: dict[Message, torch.Tensor] = {}
        """Messages here and not yet used: received in an exchange, or handed over on the rank."""
        self._outbox: dict[Message, torch.Tensor] = {}
        """Messages made and not yet sent (their exchange comes after the action that made them)."""
        self.overlap: OverlapHook = run_sequentially
        """Runs each (F;B) pair (overlap.py); the default runs F, then B."""

    # ------------------------------------------------------------------ messages
    def _send(self, t: torch.Tensor, message: Message) -> None:
        t = t.detach().contiguous()
        if self.layout.stage_to_rank[message.stage] == self.rank:  # the V's turn (DualPipeV): same rank
            self._received[message] = t
        else:
            self._outbox[message] = t

    def _recv(self, message: Message) -> torch.Tensor:
        return self._received.pop(message)

    def _exchange(self, exchange: Exchange) -> None:
        """Posts one exchange as one group (ncclGroupStart/End) and waits for it (on NCCL: the current
        stream waits)."""
        ops = []
        for op in exchange.ops:
            peer = dist.get_global_rank(self.group, op.peer)
            if op.send:
                ops.append(dist.P2POp(dist.isend, self._outbox.pop(op.message), peer, self.group))
            else:
                buf = torch.empty(self.hidden_shape, dtype=self.dtype, device=self.device)
                self._received[op.message] = buf
                ops.append(dist.P2POp(dist.irecv, buf, peer, self.group))
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def _exchange_until(self, action_index: int) -> None:
        """Runs this rank's exchanges due before its action ``action_index``."""
        while self._next < len(self.exchanges) and self.exchanges[self._next].before <= action_index:
            self._exchange(self.exchanges[self._next])
            self._next += 1

    def receive_inputs(self, actions: list[Action]) -> None:
        """Checks that what ``actions`` start from (activations, gradients) is here: the exchanges before
        an action receive all of its inputs, so inside an overlapped (F;B) pair, as in DeepSeek's
        DualPipe, no chunk waits for a pipeline peer while the other chunk waits for its turn."""
        for part in actions:
            message = input_of(self.layout, part)
            assert message is None or message in self._received, f"{part} has not received {message}"

    # ------------------------------------------------------------------ compute
    def _piece(self, stage: int) -> PipelinePiece:
        return self.pieces[self.layout.piece(stage)]

    def forward(self, stage: int, mb: int) -> None:
        prev, nxt = self.layout.prev_stage(stage), self.layout.next_stage(stage)
        x = None if prev is None else self._recv(Message(0, stage, mb)).requires_grad_()
        y = self._piece(stage)(x, tokens=self._microbatches[mb])
        if nxt is None:
            self.losses[mb] = y.detach()
        else:
            self._send(y, Message(0, nxt, mb))
        self._chunks[(stage, mb)] = _Chunk(x, y)

    def _output_grad(self, stage: int, mb: int, chunk: _Chunk) -> torch.Tensor:
        nxt = self.layout.next_stage(stage)
        if nxt is None:  # the loss: each micro-batch weighs 1/M, as the whole batch's mean
            return torch.full_like(chunk.y, 1.0 / self.plan.num_microbatches)
        return self._recv(Message(1, stage, mb))

    def backward(self, stage: int, mb: int, *, weights_too: bool) -> None:
        chunk = self._chunks[(stage, mb)]
        chunk.dy = self._output_grad(stage, mb, chunk)
        prev = self.layout.prev_stage(stage)
        if weights_too:
            torch.autograd.backward(chunk.y, chunk.dy)
            if prev is not None:
                self._send(chunk.x.grad, Message(1, prev, mb))
            del self._chunks[(stage, mb)]
            return
        if chunk.x is None:  # first stage: no input gradient; the whole backward runs at W
            return
        params = list(self._piece(stage).parameters())
        dx, chunk.param_groups = stage_backward_input([chunk.y], [chunk.dy], [chunk.x], iter(params))
        self._send(dx[0], Message(1, prev, mb))

    def weight(self, stage: int, mb: int) -> None:
        chunk = self._chunks.pop((stage, mb))
        if chunk.param_groups is None:
            torch.autograd.backward(chunk.y, chunk.dy)
        else:
            stage_backward_weight(iter(list(self._piece(stage).parameters())), chunk.param_groups)

    def run_action(self, action: Action) -> None:
        """Runs one F, B, I or W action of this rank (an overlap hook calls it for the pair's parts)."""
        kind, stage, mb = action.computation_type, action.stage_index, action.microbatch_index
        if kind == FORWARD:
            self.forward(stage, mb)
        elif kind == FULL_BACKWARD:
            self.backward(stage, mb, weights_too=True)
        elif kind == BACKWARD_INPUT:
            self.backward(stage, mb, weights_too=False)
        elif kind == BACKWARD_WEIGHT:
            self.weight(stage, mb)
        else:
            raise ValueError(f"unknown action {action}")

    def step(self, microbatches: list[torch.Tensor] | list[Batch]) -> dict[int, torch.Tensor]:
        """Runs the whole schedule on ``microbatches`` (all M: windows, or ``Batch.split``'s); returns the
        losses of the micro-batches whose last stage is on this rank, by micro-batch index."""
        self._microbatches, self._chunks, self.losses = microbatches, {}, {}
        self._received, self._outbox, self._next = {}, {}, 0
        actions = self.plan.actions[self.rank]
        for i, action in enumerate(actions):
            self._exchange_until(i)
            if action.computation_type == OVERLAP_F_B:
                self.overlap(self, *action.sub_actions)
            else:
                self.run_action(action)
        self._exchange_until(len(actions))
        assert not self._chunks, f"unfinished chunks {sorted(self._chunks)}"
        assert not self._received, f"received but unused {sorted(self._received)}"
        assert not self._outbox, f"made but not sent {sorted(self._outbox)}"
        return self.losses
