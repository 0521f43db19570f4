"""ChunkInterleaver: two chunks of work, one computing at a time, each one's collectives in flight
while the other computes.

DeepSeek-V3 pairs the forward chunk of one micro-batch with the backward chunk of another and cuts
both at their expert-parallel all-to-alls (SPEC.md §7.1):

    forward  F:  attn ─ dispatch ─ MLP ─ combine ─ attn ─ dispatch ...
    backward B:          combine⁻¹ ─ MLP ─ dispatch⁻¹ ─ attn ...
    timeline:   F.attn │ B.MLP (F's dispatch in flight) │ F.MLP (B's all-to-all in flight) │ ...

Writing the model as steps cut at every collective would mean a second forward and a hand-made
backward. Instead the two chunks run as they are, the forward on the calling thread and the backward
started from a worker thread, and take turns: a chunk runs until it issues a collective, which starts
asynchronously (``async_op=True``), hands the turn to the other chunk, and waits for the data only
when the turn comes back. The communication then runs under the other chunk's computation, and since
only one chunk computes at a time, the collectives are issued in the same order on every rank of an
expert group (the model and the schedule are the same there), which matching collectives need.

The hook is ``wait``: the expert-parallel all-to-alls (``expert_parallel.all_to_all``) call it with
the ``Work`` of every collective they start when their ``Comm.overlap`` is this interleaver. Outside
a pair, or for a chunk whose partner has finished, ``wait`` simply waits: the sequential behaviour.
Inside a pair the caller is recognised by *whose turn it is*, not by its thread: only the chunk
holding the turn runs, so whoever calls ``wait`` is that chunk. This matters on CUDA, where the
autograd engine runs a backward on its own device thread (not the worker that called
``backward()``): that thread's collectives are the backward chunk's, and pausing it pauses the chunk.

CUDA and NCCL. NCCL's ``work.wait()`` does not block the host: it makes the current (compute) stream
wait for the collective on NCCL's stream. The turns then order *kernel launches*: F issues its
dispatch (on NCCL's stream), hands over, B launches its MLP kernels on the compute stream, hands
back, and F's ``wait`` puts the stream's wait behind B's kernels, so the GPU runs B's MLP while the
all-to-all is in flight: overlap by construction, with no stream or SM tuning of our own (DeepSeek
also reserves SMs for communication; not done). Host time is no measure there, so ``stats`` times
each wait with two CUDA events on the current stream around ``work.wait()``: the elapsed time is how
long the compute stream stood still for NCCL (zero when the data was there before the stream got to
the wait), summed when ``exposed_s`` is read (which synchronises). ``timing`` picks host or CUDA
events; ``"auto"`` takes CUDA events once CUDA is initialised and the default backend is NCCL.
Unmeasured on GPUs so far (benchmarks/gpu_overlap.py is the measurement).

``stats`` counts the time chunks spend blocked in ``wait`` (the *exposed* communication) and the
collectives issued: with the same work run in pairs and run one chunk after the other, the fraction
of communication hidden is ``1 - exposed(pairs) / exposed(sequential)`` (benchmarks/overlap_comm.py
on gloo, benchmarks/gpu_overlap.py on CUDA).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

FORWARD_SLOT, BACKWARD_SLOT = 0, 1
Timing = Literal["auto", "host", "cuda"]


class ChunkAborted(RuntimeError):
    """Raised in one chunk of a pair at its next collective when the other chunk has failed."""


@dataclass
class CommStats:
    """Blocked time and count of the collectives that went through ``wait``."""

    collectives: int = 0
    in_pairs: int = 0
    """Collectives issued while the other chunk of a pair was still running (could overlap)."""
    host_s: float = 0.0
    """Exposed time measured on the host (gloo), plus the CUDA events' once settled."""
    pending: list = field(default_factory=list)
    """(start, end) CUDA events of waits not yet summed."""

    @property
    def exposed_s(self) -> float:
        """Seconds the chunks stood still for their collectives (host: blocked; CUDA: the compute stream
        waiting for NCCL's). Reading it synchronises the pending CUDA events."""
        for start, end in self.pending:
            end.synchronize()
            self.host_s += start.elapsed_time(end) / 1e3
        self.pending.clear()
        return self.host_s

    def reset(self) -> None:
        self.host_s, self.collectives, self.in_pairs = 0.0, 0, 0
        self.pending.clear()


def _cuda_timing() -> bool:
    return (
        torch.cuda.is_available()
        and torch.cuda.is_initialized()
        and dist.is_initialized()
        and "nccl" in str(dist.get_backend())
    )


class ChunkInterleaver:
    """Runs (forward, backward) chunk pairs in turns; see the module docstring."""

    def __init__(self, timing: Timing = "auto") -> None:
        if timing not in ("auto", "host", "cuda"):
            raise ValueError(f"ChunkInterleaver timing ({timing!r}) must be 'auto', 'host' or 'cuda'")
        self.timing = timing
        self._cond = threading.Condition()
        self._in_pair = False
        self._turn = FORWARD_SLOT
        """The chunk that may run (FORWARD_SLOT or BACKWARD_SLOT); the caller of ``wait`` in a pair is it."""
        self._finished: set[int] = set()
        self._failed = False
        self.stats = CommStats()

    # ------------------------------------------------------------------ the pair
    def run_pair(self, forward: Callable[[], None], backward: Callable[[], None]) -> None:
        """Runs ``forward`` on this thread and ``backward`` from a worker, forward first; returns when both
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
            self._finished, self._turn, self._failed, self._in_pair = set(), FORWARD_SLOT, False, True
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
                self._in_pair = False
        first = next((e for e in errors if not isinstance(e, ChunkAborted)), errors[0] if errors else None)
        if first is not None:
            raise first

    def _enter(self, slot: int) -> None:
        with self._cond:
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
            slot = self._turn if self._in_pair else None  # one chunk runs at a time: the caller holds the turn
            if slot is not None and 1 - slot not in self._finished:
                self.stats.in_pairs += 1
                self._turn = 1 - slot
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._turn == slot)
            if slot is not None and self._failed:
                raise ChunkAborted(f"the other chunk of this (F;B) pair failed; {what or 'a collective'} not waited for")
        self._timed_wait(work)
        self.stats.collectives += 1

    def _timed_wait(self, work: dist.Work) -> None:
        if self.timing == "cuda" or (self.timing == "auto" and _cuda_timing()):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()  # when the compute stream reaches the wait ...
            work.wait()  # ... which makes it wait for NCCL's stream ...
            end.record()  # ... until here: the exposed time
            self.stats.pending.append((start, end))
            return
        start = time.perf_counter()
        work.wait()
        self.stats.host_s += time.perf_counter() - start


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
