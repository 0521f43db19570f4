"""The (F;B) pair seam: how a forward chunk and a backward chunk of different micro-batches run together.

DeepSeek pairs the forward of one micro-batch with the backward of another and splits both into
attention, all-to-all dispatch, MLP and all-to-all combine, so that each chunk's expert-parallel
communication runs under the other chunk's computation (SPEC.md §7.1). The two chunks touch
different micro-batches, hence any interleaving of their parts gives the same result; this module is
where such an interleaving plugs in:

    class MyOverlap:                        # an OverlapHook
        def __call__(self, runtime, forward, backward):
            ...                              # e.g. F's dispatch issued async, B's MLP, F's MLP, ...

    runtime.overlap = MyOverlap()            # BidirectionalRuntime (schedule "dualpipe", or "dualpipev"
                                             # when PipelineRunner is given an overlap hook)

``run_sequentially`` (the default) runs the forward, then the backward. ``InterleavedOverlap`` runs
them as a ``ChunkInterleaver`` pair (interleaver.py): the forward computes until it issues an
expert-parallel all-to-all, which starts asynchronously while the backward computes, until the
backward issues one, and so on; the collectives' ``Comm.overlap`` must be the same interleaver
(``attach``). Without expert parallelism in the pieces there is nothing to hide and the pair runs as
the sequential one. torch's runtime runs its OVERLAP_F_B sub-actions one after the other, so
PipelineRunner runs dualpipev's lists on our runtime when it is given a hook.

The runtime has exchanged both chunks' pipeline inputs before the pair starts and sends their outputs
after it ends (bidirectional_runtime.py), so a hook may run the parts in any order: the point-to-point
order both ends of a pair of ranks agree on does not depend on it. The same holds on NCCL, where the
interleaver recognises the chunks by turn and times the compute stream's waits (interleaver.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from dsv3_lightning.plugins.dualpipe.interleaver import ChunkInterleaver
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from torch import nn
from dsv3_lightning.plugins.dualpipe.torch_pipelining import Action

if TYPE_CHECKING:
    from dsv3_lightning.plugins.dualpipe.bidirectional_runtime import BidirectionalRuntime


class OverlapHook(Protocol):
    def __call__(self, runtime: BidirectionalRuntime, forward: Action, backward: Action) -> None:
        """Runs ``forward`` (an F) and ``backward`` (a B or I) through ``runtime.run_action`` or finer."""


def run_sequentially(runtime: BidirectionalRuntime, forward: Action, backward: Action) -> None:
    runtime.run_action(forward)
    runtime.run_action(backward)


class InterleavedOverlap:
    """An OverlapHook that runs each (F;B) pair in turns, hiding each chunk's all-to-alls under the other."""

    def __init__(self, interleaver: ChunkInterleaver | None = None) -> None:
        self.interleaver = interleaver or ChunkInterleaver()

    def attach(self, module: nn.Module) -> int:
        """Routes the all-to-alls of every expert-parallel MoE layer of ``module`` through this hook's
        interleaver; returns how many layers it found."""
        count = 0
        for m in module.modules():
            dispatcher = getattr(m, "dispatcher", None)
            if isinstance(dispatcher, AllToAllTokenDispatcher):
                dispatcher.comm.overlap = self.interleaver
                count += 1
        return count

    def __call__(self, runtime: BidirectionalRuntime, forward: Action, backward: Action) -> None:
        runtime.receive_inputs([forward, backward])  # here already: the only waits left in the pair are all-to-alls
        self.interleaver.run_pair(lambda: runtime.run_action(forward), lambda: runtime.run_action(backward))
