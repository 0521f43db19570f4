"""One flat layout of ZeRO-1 (zero.py): the parameters of one (optimizer param group x shard group),
this rank's range of them, its float32 master shard, and the two bucketed collectives over it.

Layout. The parameters, in the optimizer's order, are concatenated flat into a virtual buffer of N
elements, padded with zeros to P = G·S (G: the size of the shard group's process group, S = ceil(N/G))
and cut into G contiguous ranges of S elements; rank q of the group owns [q·S, (q+1)·S). The buffer is
never allocated: the master shard holds this rank's range only, and a bucket stages a few columns of
the buffer viewed as [G, S] (row q: rank q's range), which is the shape ``reduce_scatter`` and
``all_gather`` exchange (rank q sends or receives row q's piece). The parameters fill the buffer from
the start, so the owned elements of a rank are a prefix of its shard and padding is only at the end
of the last ranks' shards (a rank may own nothing but padding).

A *segment* is the intersection of one parameter with a range: (parameter index, start and stop in
the parameter's flattened tensor, start in the range).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

# torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor (same semantics, the old names warn).
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

Segment = tuple[int, int, int, int]
"""(parameter index, start in the parameter's flattened tensor, stop, start in the range)."""


class FlatShard:
    def __init__(
        self, params: list[tuple[str, nn.Parameter]], group: dist.ProcessGroup, divisor: float, label: str
    ) -> None:
        self.names = [name for name, _ in params]
        self.params = [p for _, p in params]
        self.group, self.divisor, self.label = group, divisor, label
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if self.rank < 0:
            raise ValueError(f"zero1: this rank is not in the process group of {label}")
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"zero1: the parameters of {label} are on several devices {devices}; need one")
        self.device = devices.pop()
        for name, p in params:
            if not p.is_contiguous():
                raise ValueError(f"zero1: parameter {name!r} is not contiguous (its flat view is written to)")
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = sum(self.numels)
        self.shard_numel = -(-self.numel // self.world)  # S; the last ranks' shards end in padding
        self.start = self.rank * self.shard_numel
        self.owned: list[Segment] = list(self.segments(self.start, self.start + self.shard_numel))
        self.owned_numel = sum(hi - lo for _, lo, hi, _ in self.owned)
        dtypes = {p.dtype for p in self.params}
        # Gathered in the model's dtype when it is one (bf16 halves the traffic; the cast is the same).
        self.gather_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.master = nn.Parameter(torch.zeros(self.shard_numel, dtype=torch.float32, device=self.device))
        self.refresh_master()
        self.has_grad: list[bool] = [True] * len(self.params)
        """Per parameter: whether some rank of the group had a gradient at the last reduction."""

    def segments(self, lo: int, hi: int) -> Iterator[Segment]:
        """The parameters' pieces inside the flat range [lo, hi)."""
        i = max(0, bisect.bisect_right(self.offsets, lo) - 1)
        while i < len(self.params) and self.offsets[i] < hi:
            a, b = max(lo, self.offsets[i]), min(hi, self.offsets[i] + self.numels[i])
            if b > a:
                yield i, a - self.offsets[i], b - self.offsets[i], a - lo
            i += 1

    def flat(self, i: int) -> torch.Tensor:
        return self.params[i].detach().view(-1)

    @torch.no_grad()
    def refresh_master(self) -> None:
        """Master ← this rank's range of the model parameters (cast to float32)."""
        for i, lo, hi, at in self.owned:
            self.master.data[at : at + hi - lo].copy_(self.flat(i)[lo:hi])

    def _width(self, bucket_bytes: int) -> int:
        return max(1, bucket_bytes // (4 * self.world))

    def buckets(self, bucket_bytes: int) -> list[tuple[int, int]]:
        """Column ranges [c0, c1) of the [G, S] view, each at most ``bucket_bytes`` of float32."""
        width = self._width(bucket_bytes)
        return [(c0, min(c0 + width, self.shard_numel)) for c0 in range(0, self.shard_numel, width)]

    def bucket_numel(self, bucket_bytes: int) -> int:
        """Elements of the largest bucket (G columns)."""
        return self.world * min(self._width(bucket_bytes), self.shard_numel)

    def _last_column(self, i: int) -> int:
        """The column after which parameter i's gradient has been staged entirely."""
        first, last = self.offsets[i], self.offsets[i] + self.numels[i] - 1
        row = first // self.shard_numel
        return last - row * self.shard_numel + 1 if last // self.shard_numel == row else self.shard_numel

    @torch.no_grad()
    def reduce_scatter(self, bucket_bytes: int) -> None:
        """master.grad ← (Σ over the group of the model gradients, this rank's range) / divisor, float32;
        the model gradients are freed as soon as they are staged. Collective over ``group``."""
        flags = [p.grad is not None for p in self.params]
        flags = torch.tensor(flags, dtype=torch.float32, device=self.device)
        dist.all_reduce(flags, group=self.group)
        self.has_grad = [bool(f) for f in flags.tolist()]  # one host sync per layout and step
        self.master.grad = None
        if not any(self.has_grad):
            return
        grad = torch.empty_like(self.master)
        by_last = sorted(range(len(self.params)), key=self._last_column)
        freed = 0
        pending: deque = deque()
        for c0, c1 in self.buckets(bucket_bytes):
            w = c1 - c0
            staged = torch.zeros(self.world * w, dtype=torch.float32, device=self.device)
            for q in range(self.world):
                row = q * self.shard_numel
                for i, lo, hi, at in self.segments(row + c0, row + c1):
                    if self.params[i].grad is not None:
                        g = self.params[i].grad.reshape(-1)
                        staged[q * w + at : q * w + at + hi - lo].copy_(g[lo:hi])
            while freed < len(by_last) and self._last_column(by_last[freed]) <= c1:
                self.params[by_last[freed]].grad = None
                freed += 1
            pending.append((_reduce_scatter(grad[c0:c1], staged, group=self.group, async_op=True), staged))
            if len(pending) == 2:  # two buckets in flight: staging bucket k+1 overlaps bucket k's transfer
                pending.popleft()[0].wait()
        while pending:
            pending.popleft()[0].wait()
        for p in self.params:
            p.grad = None
        if any(self.has_grad[i] for i, *_ in self.owned):
            self.master.grad = grad.div_(self.divisor)

    @torch.no_grad()
    def all_gather(self, bucket_bytes: int) -> None:
        """Model parameters ← the group's master shards, cast to each parameter's dtype. Collective."""
        pending: deque = deque()

        def scatter(out: torch.Tensor, c0: int, c1: int) -> None:
            w = c1 - c0
            for q in range(self.world):
                row = q * self.shard_numel
                for i, lo, hi, at in self.segments(row + c0, row + c1):
                    self.flat(i)[lo:hi].copy_(out[q * w + at : q * w + at + hi - lo])

        for c0, c1 in self.buckets(bucket_bytes):
            local = self.master.detach()[c0:c1].to(self.gather_dtype)
            out = torch.empty(self.world * (c1 - c0), dtype=self.gather_dtype, device=self.device)
            pending.append((_all_gather(out, local, group=self.group, async_op=True), out, local, c0, c1))
            del out, local  # the bucket in flight is held by ``pending`` only: two buckets live, not three
            if len(pending) == 2:
                work, out, _, *columns = pending.popleft()
                work.wait()
                scatter(out, *columns)
                del out
        while pending:
            work, out, _, *columns = pending.popleft()
            work.wait()
            scatter(out, *columns)

    def hold_skipped(self, state: dict) -> list[tuple[int, int, torch.Tensor, dict[str, torch.Tensor]]]:
        """Copies of the master and per-element state of the owned segments of parameters without a
        gradient, to be put back after the step (``put_back``)."""
        held = []
        for i, lo, hi, at in self.owned:
            if not self.has_grad[i]:
                n = hi - lo
                per_element = {k: v[at : at + n].clone() for k, v in state.items() if self.is_per_element(v)}
                held.append((at, n, self.master.detach()[at : at + n].clone(), per_element))
        return held

    @torch.no_grad()
    def put_back(self, held: list, state: dict) -> None:
        for at, n, master, per_element in held:
            self.master.data[at : at + n].copy_(master)
            for key, values in per_element.items():
                state[key][at : at + n].copy_(values)

    def is_per_element(self, value: object) -> bool:
        return torch.is_tensor(value) and value.shape == self.master.shape

    def name_filter(self, counted: Callable[[str], bool]) -> list[Segment]:
        return [s for s in self.owned if counted(self.names[s[0]])]
