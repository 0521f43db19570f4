"""The (F;B) pair seam: how a forward chunk and a backward chunk of different micro-batches run together.

DeepSeek pairs the forward of one micro-batch with the backward of another and splits both into
attention, all-to-all dispatch, MLP and all-to-all combine, so that each chunk's expert-parallel
communication runs under the other chunk's computation (SPEC.md §7.1). The two chunks touch
different micro-batches, hence any interleaving of their parts gives the same result; this module is
where such an interleaving plugs in:

    class MyOverlap:                        # an OverlapHook
        def __call__(self, runtime, forward, backward):
            ...                              # e.g. F's dispatch issued async, B's MLP, F's MLP, ...

    runtime.overlap = MyOverlap()            # BidirectionalRuntime (schedule "dualpipe")

``run_sequentially`` (the default) runs the forward, then the backward. Not implemented yet: a hook
that really interleaves the parts, which needs expert parallelism's all-to-all dispatcher issued
asynchronously, and a measurement of the communication time it hides; torch's runtime (dualpipev)
also runs its OVERLAP_F_B sub-actions one after the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch.distributed.pipelining.schedules import _Action

if TYPE_CHECKING:
    from dsv3_lightning.plugins.dualpipe.bidirectional_runtime import BidirectionalRuntime


class OverlapHook(Protocol):
    def __call__(self, runtime: BidirectionalRuntime, forward: _Action, backward: _Action) -> None:
        """Runs ``forward`` (an F) and ``backward`` (a B or I) through ``runtime.run_action`` or finer."""


def run_sequentially(runtime: BidirectionalRuntime, forward: _Action, backward: _Action) -> None:
    runtime.run_action(forward)
    runtime.run_action(backward)
