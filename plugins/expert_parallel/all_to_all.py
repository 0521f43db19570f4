"""All-to-all with uneven splits, differentiable, and with errors that say what to do.

``all_to_all(x, output_splits, input_splits, comm)`` sends rows ``input_splits[j]`` of ``x`` (in rank
order) to rank j of ``comm.group`` and returns what every rank sent here, ``output_splits[i]`` rows from
rank i. Its gradient is the same exchange in reverse (the splits swapped): dispatch's backward is a
combine and combine's backward a dispatch.

Every collective goes through ``collective``, which turns a dead peer or a timeout (gloo raises on a
closed socket or after the group's timeout; NCCL's watchdog aborts after it) into one clear
``RuntimeError`` naming the operation, the layer, the timeout and the YAML key, instead of a bare
backend message, or a hang.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class AsyncWait(Protocol):
    """Where an all-to-all started asynchronously waits for its data (dualpipe's ChunkInterleaver,
    which lets another chunk compute meanwhile)."""

    def wait(self, work: dist.Work, what: str) -> None: ...


@dataclass
class Comm:
    """A process group and what to say when a collective on it fails."""

    group: dist.ProcessGroup | None
    timeout_s: float
    where: str
    """e.g. "layer model.model.layers.1.mlp", named in errors."""
    overlap: AsyncWait | None = None
    """None: the all-to-alls block where they are issued. Otherwise they start asynchronously and wait
    in ``overlap.wait`` (set by a pipeline that overlaps a forward and a backward chunk)."""


class ExpertParallelCommError(RuntimeError):
    """A collective of the expert-parallel strategy failed: a rank died, or stopped answering."""


def collective(comm: Comm, what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ExpertParallelCommError:
        raise
    except (RuntimeError, dist.DistError) as err:  # DistBackendError, gloo's "Connection closed by peer"...
        raise ExpertParallelCommError(
            f"expert parallel: the {what} of {comm.where} failed: another rank died or did not answer within "
            f"the timeout ({comm.timeout_s:g} s, trainer.strategy.init_args.timeout). Check the other ranks' "
            f"logs for the first error; raise the timeout if a rank is just slow. Backend error: {err}"
        ) from err


def all_to_all_counts(counts: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Equal-split exchange of a 1-D count tensor (no autograd): row blocks of len(counts)/group size."""
    out = torch.empty_like(counts)
    _all_to_all_single(comm, "count exchange", out, counts.contiguous())
    return out


def _all_to_all_single(comm: Comm, what: str, out: torch.Tensor, x: torch.Tensor, out_splits=None, in_splits=None):
    def run() -> None:
        if comm.overlap is None:
            dist.all_to_all_single(out, x, out_splits, in_splits, group=comm.group)
        else:
            work = dist.all_to_all_single(out, x, out_splits, in_splits, group=comm.group, async_op=True)
            comm.overlap.wait(work, what)

    collective(comm, what, run)


def exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int], comm: Comm, what: str):
    """The uneven all-to-all of the rows of ``x`` without autograd (any dtype the backend moves)."""
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    _all_to_all_single(comm, what, out, x.contiguous(), output_splits, input_splits)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, comm, what):
        ctx.splits, ctx.comm, ctx.what = (output_splits, input_splits), comm, what
        return exchange(x, output_splits, input_splits, comm, what)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        grad = exchange(grad, input_splits, output_splits, ctx.comm, f"backward of the {ctx.what}")
        return grad, None, None, None, None


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], comm: Comm, what: str
) -> torch.Tensor:
    """Differentiable uneven all-to-all of the rows of ``x`` over ``comm.group``."""
    return _AllToAll.apply(x, output_splits, input_splits, comm, what)
