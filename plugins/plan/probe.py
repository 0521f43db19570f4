"""Running real code on the meta device, and counting what it keeps: the plan's instruments.

- ``MetaRun``: a ``TorchDispatchMode`` under which code written for real tensors runs on meta ones.
  The few reads of a value (``.item()``, ``.tolist()``, ``float(t)``: a meta tensor has none) return
  ones, so that ``reduce_gradients`` sees "every parameter has a gradient" and ``clip_global_norm`` a
  norm of 1 (no clipping); ``bincount`` (no meta kernel) returns a count tensor of the right length;
  a float32 ``grouped_mm`` (whose meta kernel takes bfloat16 only) gets its float32 output shape.
  With ``track``, it also keeps the bytes of every storage alive that an operator created (or a
  gradient it was told of), and their peak: ``peak - start`` is the transient memory of the code run
  under it (the gradient reduction's buffers), freed storages subtracted as Python drops them.
- ``saved_storages``: the bytes autograd saves for backward while a forward runs, counted once per
  storage (views of one tensor are one allocation), leaving out storages it is told are not
  activations (parameters, buffers, RoPE tables).
- ``optimizer_state_bytes``: the run's optimizer stepped once on meta gradients (fused kernels off:
  they refuse meta tensors), and the bytes of the state it keeps.
- ``FusedAttention``: on the meta device ``scaled_dot_product_attention`` falls back to its math path,
  which saves the [B, H, S, S] attention probabilities; a GPU runs a fused kernel for MLA's shapes
  (query/key head dim != value head dim, so PyTorch's memory-efficient kernel, not flash), which
  saves the output and the log-sum-exp only. This ``TorchFunctionMode`` routes the call to that
  kernel (``aten._scaled_dot_product_efficient_attention``, which has a meta kernel), so the count is
  a GPU's. A CPU runs the math path for these head dims: ``attention="math"`` counts that.

Storages are told apart by their ``StorageImpl`` address (``untyped_storage()._cdata``), which meta
tensors have too; nothing here allocates memory for a meta tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class MetaRun(TorchDispatchMode):
    """Runs real code on meta tensors (see the module docstring); ``track=True`` measures live bytes."""

    def __init__(self, *, track: bool = False) -> None:
        super().__init__()
        self.track = track
        self._bytes: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self.live = self.peak = 0

    # ------------------------------------------------------------------ live-bytes tracking
    def watch_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Counts the gradients that exist before the measured code, which it may replace and free.
        No reference to them is kept here, so they are freed when the code drops them."""
        for p in params:
            if p.grad is not None:
                self._hold(p.grad)

    def watch(self, tensors: Iterable[torch.Tensor]) -> None:
        """Counts the storages of tensors that exist before the measured code (parameters, master
        shards): views of them it makes are then not new allocations."""
        for t in tensors:
            self._hold(t)

    def _hold(self, t: torch.Tensor) -> None:
        key = storage_key(t)
        if key not in self._refs:
            self._refs[key] = 0
            self._bytes[key] = storage_bytes(t)
            self.live += self._bytes[key]
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= self._bytes.pop(key)

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        on_meta = isinstance(first, torch.Tensor) and first.is_meta
        if on_meta and func is aten._local_scalar_dense.default:
            return True if first.dtype == torch.bool else 1 if not first.is_floating_point() else 1.0
        if on_meta and func is aten._to_copy.default and str(kwargs.get("device")) == "cpu":
            return torch.ones(first.shape, dtype=kwargs.get("dtype") or first.dtype)
        if on_meta and func is aten.bincount.default:
            minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            if not minlength:
                raise NotImplementedError("bincount on the meta device needs minlength (the output length)")
            return torch.empty(minlength, dtype=torch.int64, device="meta")
        if on_meta and func.overloadpacket is aten._grouped_mm and first.dtype != torch.bfloat16:
            # the meta kernel takes bfloat16 only (CPU runs float32 too): same shapes, the caller's dtype
            cast = [
                a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args
            ]
            return func(*cast, **kwargs).to(first.dtype)
        out = func(*args, **kwargs)
        if self.track:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._hold(t)
        return out


def transient_bytes(
    fn: Callable[[], Any], params: Iterable[torch.Tensor] = (), existing: Iterable[torch.Tensor] = ()
) -> int:
    """Peak bytes above the start that ``fn`` holds at once; the gradients of ``params`` are counted
    from the start (``fn`` may replace them), and so are the storages of ``existing`` tensors, so that
    a view of one (a slice of a parameter or of a ZeRO-1 master shard) is not taken for an allocation."""
    with MetaRun(track=True) as run:
        run.watch_gradients(params)
        run.watch(existing)
        start = run.live
        fn()
    return run.peak - start


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def unfused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` with torch's fused kernels switched off: they refuse meta tensors (the state the
    unfused step keeps is the same)."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            group["fused"] = False
    return optimizer


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """One step of ``optimizer`` on meta gradients; the bytes of the state it then keeps."""
    with MetaRun():
        unfused(optimizer).step()
    return tensor_bytes(
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )


def saved_storages(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> dict[int, int]:
    """Bytes by storage of what autograd saves for backward while ``fn`` runs (each storage once:
    views of one tensor are one allocation); the graph is dropped after counting. ``exclude``:
    tensors whose storages are not activations (parameters, buffers)."""
    skip = {storage_key(t) for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in skip:
            seen[key] = storage_bytes(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return seen


class FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as a GPU's fused kernel keeps it (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        if kwargs.get("enable_gqa") or len(args) > 3:
            raise NotImplementedError("FusedAttention takes q, k, v positionally and the rest by keyword")
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        out = aten._scaled_dot_product_efficient_attention(
            q,
            k,
            v,
            kwargs.get("attn_mask"),
            grad,
            kwargs.get("dropout_p", 0.0),
            kwargs.get("is_causal", False),
            scale=kwargs.get("scale"),
        )
        return out[0]


__all__ = [
    "FusedAttention",
    "MetaRun",
    "optimizer_state_bytes",
    "saved_storages",
    "storage_bytes",
    "storage_key",
    "tensor_bytes",
    "transient_bytes",
    "unfused",
]
