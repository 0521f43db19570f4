"""The action lists of DeepSeek's original, bidirectional DualPipe (two copies of every stage).

torch.distributed.pipelining has DualPipeV but not the two-copy DualPipe, so this module writes its
per-rank action lists in torch's ``Action`` notation, for ``bidirectional_layout`` (layout.py):
stages 0..N-1 are the forward direction (micro-batches 0..C-1 enter at rank 0), stages N..2N-1 the
reverse direction (micro-batches C..2C-1 enter at rank N-1), C = num_microbatches / 2.

Each rank calls "chunk 0" the direction whose entry is nearer to it (forward for ranks < N/2,
reverse for the others) and "chunk 1" the other; with h = min(r, N-1-r), H = N/2 every rank runs the
eight phases of SPEC.md §7.2 (F = forward, B = full backward, I = input-gradient part of a backward
whose weight part W is deferred to a FIFO, (F;B) = a forward and a backward of different micro-batches
issued as one overlapped pair, torch's OVERLAP_F_B):

    Step 1  nF0        2(H-h-1) x  F0
    Step 2  nF0F1      h+1      x  F0 F1
    Step 3  nB1W1F1    H-h-1    x  I1 W F1
    Step 4  main       C-2H+h+1 x  (F0;B1) (F1;B0)      the middle ranks' first F0, B1 not paired
    Step 5  nB1F1B0    H-h-1    x  B1 (F1;B0)
    Step 6  nB1B0      h+1      x  B1 B0                 I instead of B from the middle round on
    Step 7  nWB0       H-h-1    x  W I0
    Step 8  nW         h+1      x  W

Constraints (DualPipe's own): N even, num_microbatches even and >= 2N (``validate`` in plans.py).
"""

from __future__ import annotations

from collections import deque

from dsv3_lightning.plugins.dualpipe.torch_pipelining import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    Action,
)


class _RankProgram:
    """Emits one rank's actions, numbering micro-batches per chunk and queueing deferred W's."""

    def __init__(self, stages: tuple[int, int], first_mb: tuple[int, int]) -> None:
        self.stages = stages
        self.next_f = list(first_mb)
        self.next_b = list(first_mb)
        self.pending_w: deque[Action] = deque()
        self.actions: list[Action] = []

    def _f(self, chunk: int) -> Action:
        action = Action(self.stages[chunk], FORWARD, self.next_f[chunk])
        self.next_f[chunk] += 1
        return action

    def _b(self, chunk: int, zero_bubble: bool = False) -> Action:
        kind = BACKWARD_INPUT if zero_bubble else FULL_BACKWARD
        action = Action(self.stages[chunk], kind, self.next_b[chunk])
        self.next_b[chunk] += 1
        if zero_bubble:
            self.pending_w.append(Action(action.stage_index, BACKWARD_WEIGHT, action.microbatch_index))
        return action

    def forward(self, chunk: int) -> None:
        self.actions.append(self._f(chunk))

    def backward(self, chunk: int, zero_bubble: bool = False) -> None:
        self.actions.append(self._b(chunk, zero_bubble))

    def weight(self) -> None:
        if self.pending_w:
            self.actions.append(self.pending_w.popleft())

    def overlapped(self, f_chunk: int, b_chunk: int) -> None:
        self.actions.append(Action(-1, OVERLAP_F_B, None, (self._f(f_chunk), self._b(b_chunk))))


def dualpipe_actions(num_ranks: int, num_microbatches: int) -> dict[int, list[Action]]:
    """Per-rank compute actions of DualPipe for ``num_ranks`` (even) and ``num_microbatches`` (even, >= 2N)."""
    n, half = num_ranks, num_ranks // 2
    c = num_microbatches // 2
    out = {}
    for rank in range(n):
        forward_stage, reverse_stage = rank, 2 * n - 1 - rank
        if rank < half:  # chunk 0 = the forward direction
            prog = _RankProgram((forward_stage, reverse_stage), (0, c))
        else:  # chunk 0 = the reverse direction, whose micro-batches enter at rank N-1
            prog = _RankProgram((reverse_stage, forward_stage), (c, 0))
        h = min(rank, n - 1 - rank)
        middle = h == half - 1

        # Step 1: nF0
        for _ in range(2 * (half - h - 1)):
            prog.forward(0)
        # Step 2: nF0F1
        for _ in range(h + 1):
            prog.forward(0)
            prog.forward(1)
        # Step 3: nB1W1F1 (zero bubble: the W fills the wait for the next F1's input)
        for _ in range(half - h - 1):
            prog.backward(1, zero_bubble=True)
            prog.weight()
            prog.forward(1)
        # Step 4 (main): nF0B1F1B0
        for i in range(c - 2 * half + h + 1):
            if i == 0 and middle:  # the first B1 is ready only after F0: not worth pairing
                prog.forward(0)
                prog.backward(1)
            else:
                prog.overlapped(0, 1)
            prog.overlapped(1, 0)
        # Step 5: nB1F1B0
        for _ in range(half - h - 1):
            prog.backward(1)
            prog.overlapped(1, 0)
        # Step 6: nB1B0, the second half with zero bubble
        zero_bubble = False
        for i in range(h + 1):
            if i == (h + 1) // 2 and h % 2 == 1:
                zero_bubble = True
            prog.backward(1, zero_bubble)
            if i == (h + 1) // 2 and h % 2 == 0:
                zero_bubble = True
            prog.backward(0, zero_bubble)
        # Step 7: nWB0
        for _ in range(half - h - 1):
            prog.weight()
            prog.backward(0, zero_bubble=True)
        # Step 8: nW
        while prog.pending_w:
            prog.weight()
        assert prog.next_f == prog.next_b == [prog.next_f[0], prog.next_f[1]]
        out[rank] = prog.actions
    return out
