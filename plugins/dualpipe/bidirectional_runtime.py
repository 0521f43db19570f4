"""Our runtime for the two-copy DualPipe: runs ``dualpipe_actions`` lists with tagged point-to-point.

torch.distributed.pipelining's runtime assumes one chain of stages (stage s feeds s + 1, stage 0 is
the first, the last index the last), so it cannot run two pipelines in opposite directions over the
same ranks. This runtime does, for ``bidirectional_layout``: stage s (forward direction, s < N) or
N + s (reverse direction) runs piece s on rank s or N-1-s. It reuses torch's backward split
(``_backward.stage_backward_input`` / ``stage_backward_weight``, what torch's stages use for I and W).
It runs any layout's action lists (layout.py); for ``v_layout`` (DualPipeV's lists, taken from torch)
the hand-over at the bottom of the V, between two stages of one rank, stays on the rank. The runner
uses it for ``dualpipev`` when (F;B) pairs are to be overlapped, which torch's runtime does not do.

Per action, in list order:

    F(s, m)    x = tokens (first stage) or recv(activation of s-1's rank, tag); y = piece(x, tokens_m);
               isend(y) to next(s)'s rank, unless s is a chain's last stage (y is the loss)
    B(s, m)    dy = recv(gradient) (last stage: 1/M); full backward; isend(dx) to prev(s)'s rank
    I(s, m)    dx only (weight part kept); isend(dx)      (first stage: nothing to send, all done at W)
    W(s, m)    the kept weight part
    (F;B)      ``overlap(self, F, B)`` (overlap.py): by default the F, then the B; InterleavedOverlap
               first receives both chunks' inputs (``receive_inputs``), then runs the chunks in turns

Two messages between a pair of ranks can be in flight in both directions at once (forward-direction
activations and reverse-direction gradients both go from rank r to r + 1), and gloo and NCCL match
untagged messages in order; so every message carries a tag unique to (kind, stage, micro-batch).
Receives block when the data is needed; sends are asynchronous and waited at the end of the step.
The simulator proves the lists free of deadlock when communication is instantaneous; with
asynchronous sends and receives posted on demand that is also true here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.dualpipe.overlap import OverlapHook, run_sequentially
from dsv3_lightning.plugins.dualpipe.partition import PipelinePiece
from dsv3_lightning.plugins.dualpipe.plans import SchedulePlan
from dsv3_lightning.plugins.dualpipe.torch_pipelining import stage_backward_input, stage_backward_weight
from dsv3_lightning.plugins.dualpipe.torch_pipelining import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    Action,
)


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
        self._received: dict[tuple[int, int, int, int], torch.Tensor] = {}
        """Messages taken in ahead of their action (``receive_inputs``), by (from, kind, stage, mb)."""
        self.overlap: OverlapHook = run_sequentially
        """Runs each (F;B) pair (overlap.py); the default runs F, then B."""

    # ------------------------------------------------------------------ messages
    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, self.layout.stage_to_rank[stage])

    def _tag(self, kind: int, stage: int, mb: int) -> int:
        return (kind * self.layout.num_stages + stage) * self.plan.num_microbatches + mb

    def _send(self, t: torch.Tensor, to_stage: int, kind: int, stage: int, mb: int) -> None:
        t = t.detach().contiguous()
        if self.layout.stage_to_rank[to_stage] == self.rank:  # the V's turn (DualPipeV): same rank
            sender = self.layout.prev_stage(to_stage) if kind == 0 else self.layout.next_stage(to_stage)
            self._received[(sender, kind, stage, mb)] = t
            return
        self._sends.append(
            (t, dist.isend(t, self._peer(to_stage), group=self.group, tag=self._tag(kind, stage, mb)))
        )

    def _irecv(self, from_stage: int, kind: int, stage: int, mb: int) -> tuple[torch.Tensor, dist.Work]:
        buf = torch.empty(self.hidden_shape, dtype=self.dtype, device=self.device)
        return buf, dist.irecv(buf, self._peer(from_stage), group=self.group, tag=self._tag(kind, stage, mb))

    def _recv(self, from_stage: int, kind: int, stage: int, mb: int) -> torch.Tensor:
        received = self._received.pop((from_stage, kind, stage, mb), None)
        if received is not None:
            return received
        buf, work = self._irecv(from_stage, kind, stage, mb)
        work.wait()
        return buf

    def _input_of(self, action: Action) -> tuple[int, int, int, int] | None:
        """(from stage, kind, stage, micro-batch) of the message an F or B/I action starts by receiving."""
        stage, mb = action.stage_index, action.microbatch_index
        if action.computation_type == FORWARD:
            prev = self.layout.prev_stage(stage)
            return None if prev is None else (prev, 0, stage, mb)
        if action.computation_type in (FULL_BACKWARD, BACKWARD_INPUT):
            nxt = self.layout.next_stage(stage)
            return None if nxt is None else (nxt, 1, stage, mb)
        return None

    def receive_inputs(self, actions: list[Action]) -> None:
        """Receives what ``actions`` start from (activations, gradients) before any of them runs, as
        DeepSeek's DualPipe does before an overlapped (F;B) pair: inside the pair no chunk then waits
        for a peer while the other chunk waits for its turn."""
        pending = []
        for action in actions:
            key = self._input_of(action)
            if key is None or key in self._received:
                continue
            self._received[key], work = self._irecv(*key)
            pending.append(work)
        for work in pending:
            work.wait()

    # ------------------------------------------------------------------ compute
    def _piece(self, stage: int) -> PipelinePiece:
        return self.pieces[self.layout.piece(stage)]

    def forward(self, stage: int, mb: int) -> None:
        prev, nxt = self.layout.prev_stage(stage), self.layout.next_stage(stage)
        tokens = self._tokens[mb]
        if prev is None:
            x = None
            y = self._piece(stage)(tokens, tokens)
        else:
            x = self._recv(prev, 0, stage, mb).requires_grad_()
            y = self._piece(stage)(x, tokens)
        if nxt is None:
            self.losses[mb] = y.detach()
        else:
            self._send(y, nxt, 0, nxt, mb)
        self._chunks[(stage, mb)] = _Chunk(x, y)

    def _output_grad(self, stage: int, mb: int, chunk: _Chunk) -> torch.Tensor:
        nxt = self.layout.next_stage(stage)
        if nxt is None:  # the loss: each micro-batch weighs 1/M, as the whole batch's mean
            return torch.full_like(chunk.y, 1.0 / self.plan.num_microbatches)
        return self._recv(nxt, 1, stage, mb)

    def backward(self, stage: int, mb: int, *, weights_too: bool) -> None:
        chunk = self._chunks[(stage, mb)]
        chunk.dy = self._output_grad(stage, mb, chunk)
        prev = self.layout.prev_stage(stage)
        if weights_too:
            torch.autograd.backward(chunk.y, chunk.dy)
            if prev is not None:
                self._send(chunk.x.grad, prev, 1, prev, mb)
            del self._chunks[(stage, mb)]
            return
        if chunk.x is None:  # first stage: no input gradient; the whole backward runs at W
            return
        params = list(self._piece(stage).parameters())
        dx, chunk.param_groups = stage_backward_input([chunk.y], [chunk.dy], [chunk.x], iter(params))
        self._send(dx[0], prev, 1, prev, mb)

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

    def step(self, tokens_mbs: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Runs the whole schedule on ``tokens_mbs`` (all M micro-batches); returns the losses of the
        micro-batches whose last stage is on this rank, by micro-batch index."""
        self._tokens, self._chunks, self._sends, self.losses = tokens_mbs, {}, [], {}
        self._received = {}
        for action in self.plan.actions[self.rank]:
            if action.computation_type == OVERLAP_F_B:
                self.overlap(self, *action.sub_actions)
            else:
                self.run_action(action)
        for _, work in self._sends:
            work.wait()
        assert not self._chunks, f"unfinished chunks {sorted(self._chunks)}"
        assert not self._received, f"received but unused {sorted(self._received)}"
        return self.losses
