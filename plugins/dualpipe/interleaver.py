"""ChunkInterleaver: two chunks of work, one computing at a time, each one's collectives in flight
while the other computes.

DeepSeek-V3 pairs the forward chunk of one micro-batch with the backward chunk of another and cuts
both at their expert-parallel all-to-alls (SPEC.md §7.1):

    forward  F:  attn ─ dispatch ─ MLP ─ combine ─ attn ─ dispatch ...
    backward B:          combine⁻¹ ─ MLP ─ dispatch⁻¹ ─ attn ...
    timeline:   F.attn │ B.MLP (F's dispatch in flight) │ F.MLP (B's all-to-all in flight) │ ...

Writing the model as steps cut at every collective would mean a second forward and a hand-made
backward. Instead the two chunks run as they are, the forward on the calling thread and the backward
on a worker thread, and take turns: a chunk runs until it issues a collective, which starts
asynchronously (``async_op=True``), hands the turn to the other chunk, and waits for the data only
when the turn comes back. The communication then runs under the other chunk's computation, and since
only one chunk computes at a time, the collectives are issued in the same order on every rank of an
expert group (the model and the schedule are the same there), which matching collectives need.

The hook is ``wait``: the expert-parallel all-to-alls (``expert_parallel.all_to_all``) call it with
the ``Work`` of every collective they start when their ``Comm.overlap`` is this interleaver. Outside
a pair, or for a chunk whose partner has finished, ``wait`` simply waits: the sequential behaviour.

``stats`` counts the time chunks spend blocked in ``wait`` (the *exposed* communication) and the
collectives issued: with the same work run in pairs and run one chunk after the other, the fraction
of communication hidden is ``1 - exposed(pairs) / exposed(sequential)`` (benchmarks/overlap_comm.py).

On CUDA the autograd engine runs a backward on its device threads, not on the caller's: that chunk's
collectives are then not recognised and wait where they are issued (no overlap, same results), and
NCCL's ``wait`` does not block the host, so ``stats`` would not measure communication. The runtime
that uses this (schedules "dualpipe" and "dualpipev") runs on gloo only; on GPUs it is untested.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

FORWARD_SLOT, BACKWARD_SLOT = 0, 1


class ChunkAborted(RuntimeError):
    """Raised in one chunk of a pair at its next collective when the other chunk has failed."""


@dataclass
class CommStats:
    """Blocked time and count of the collectives that went through ``wait``."""

    exposed_s: float = 0.0
    collectives: int = 0
    in_pairs: int = 0
    """Collectives issued while the other chunk of a pair was still running (could overlap)."""

    def reset(self) -> None:
        self.exposed_s, self.collectives, self.in_pairs = 0.0, 0, 0


class ChunkInterleaver:
    """Runs (forward, backward) chunk pairs in turns; see the module docstring."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._slots: dict[int, int] = {}
        """Thread id -> slot (FORWARD_SLOT on the caller, BACKWARD_SLOT on the worker) during a pair."""
        self._turn = FORWARD_SLOT
        self._finished: set[int] = set()
        self._failed = False
        self.stats = CommStats()

    # ------------------------------------------------------------------ the pair
    def run_pair(self, forward: Callable[[], None], backward: Callable[[], None]) -> None:
        """Runs ``forward`` on this thread and ``backward`` on a worker, forward first; returns when both
        are done. If either fails, the other stops at its next collective (``ChunkAborted``), instead of
        waiting for peers until the collectives time out, and the first error is raised here."""
        errors: list[BaseException] = []
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

        def worker() -> None:
            if device is not None:
                torch.cuda.set_device(device)  # the current device is per thread
            self._enter(BACKWARD_SLOT)
            try:
                if not self._failed:
                    backward()
            except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
                errors.append(err)
                self._failed = True
            finally:
                self._finish(BACKWARD_SLOT)

        with self._cond:
            self._slots, self._finished, self._turn, self._failed = {}, set(), FORWARD_SLOT, False
            self._slots[threading.get_ident()] = FORWARD_SLOT
        thread = None
        try:
            thread = threading.Thread(target=worker, name="dsv3-overlap-backward", daemon=True)
            thread.start()
            forward()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the backward stopped
            self._failed = True
            errors.insert(0, err)
        finally:
            self._finish(FORWARD_SLOT)
            if thread is not None and thread.ident is not None:
                thread.join()
            with self._cond:
                self._slots = {}
        first = next((e for e in errors if not isinstance(e, ChunkAborted)), errors[0] if errors else None)
        if first is not None:
            raise first

    def _enter(self, slot: int) -> None:
        with self._cond:
            self._slots[threading.get_ident()] = slot
            self._cond.wait_for(lambda: self._turn == slot)

    def _finish(self, slot: int) -> None:
        with self._cond:
            self._finished.add(slot)
            self._turn = 1 - slot
            self._cond.notify_all()

    # ------------------------------------------------------------------ the collectives' hook
    def wait(self, work: dist.Work, what: str = "") -> None:
        """Waits for ``work`` (a collective just issued); inside a pair, lets the other chunk compute first."""
        with self._cond:
            slot = self._slots.get(threading.get_ident())
            if slot is not None and 1 - slot not in self._finished:
                self.stats.in_pairs += 1
                self._turn = 1 - slot
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._turn == slot)
            if slot is not None and self._failed:
                raise ChunkAborted(f"the other chunk of this (F;B) pair failed; {what or 'a collective'} not waited for")
        start = time.perf_counter()
        work.wait()
        self.stats.exposed_s += time.perf_counter() - start
        self.stats.collectives += 1


def one_f_one_b(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    microbatches: Sequence[torch.Tensor],
    interleaver: ChunkInterleaver | None = None,
) -> list[torch.Tensor]:
    """Forward and backward of every micro-batch in DualPipe's steady-state order on one stage, F0,
    (F1;B0), (F2;B1), ..., B(n-1): each pair run by ``interleaver`` (in turns) or, without one, its
    forward then its backward. The overlap of expert parallelism's all-to-alls without a pipeline
    (what benchmarks/overlap_comm.py times); gradients accumulate as for any order. Returns the
    micro-batches' losses, detached."""
    losses = [loss_of(microbatches[0])]
    for mb in microbatches[1:]:
        previous = losses[-1]

        def forward(mb=mb) -> None:
            losses.append(loss_of(mb))

        if interleaver is None:
            forward()
            previous.backward()
        else:
            interleaver.run_pair(forward, previous.backward)
    losses[-1].backward()
    return [loss.detach() for loss in losses]
