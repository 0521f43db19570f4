"""FP8 dispatch (SPEC.md §6.3): the dispatched activations cross the network as E4M3 values with one
float32 scale per 1x128 tile, the layout the FP8 plugin's GEMMs read (``quantize_tiles``), then are
dequantized on arrival into the activations' dtype, so the experts' grouped matmul, whatever its
arithmetic, sees a tensor of the usual dtype.

Bytes per token copy: D (values) + 4·ceil(D/128) (scales), against 2·D in bf16 or 4·D in float32.
The gradient goes back (the backward of the dispatch is a combine) unquantized, as DeepSeek-V3 keeps
combine in BF16. Autograd treats the round trip as the identity (straight-through): the gradient of
the received copies is sent back as is. DeepSeek fuses quantization into the dispatch kernel; here it
is one extra pass before the all-to-all. The values travel as bytes (uint8 view), which every
backend, gloo included, can move.
"""

from __future__ import annotations

import torch
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm, exchange
from dsv3_lightning.plugins.fp8.quant import FP8_DTYPE, quantize_tiles

BLOCK = 128


def fp8_bytes_per_row(hidden: int) -> int:
    return hidden + 4 * -(-hidden // BLOCK)


class _FP8AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, comm):
        ctx.splits, ctx.comm = (output_splits, input_splits), comm
        hidden = x_ND.shape[-1]
        q = quantize_tiles(x_ND.detach().float(), BLOCK)
        values = q.q[:, :hidden].contiguous().view(torch.uint8)  # the zero padding is not sent
        values = exchange(values, output_splits, input_splits, comm, "FP8 dispatch all-to-all (values)")
        scales = exchange(q.s, output_splits, input_splits, comm, "FP8 dispatch all-to-all (scales)")
        expanded = scales.repeat_interleave(BLOCK, dim=1)[:, :hidden]
        return (values.view(FP8_DTYPE).float() * expanded).to(x_ND.dtype)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        grad = exchange(grad, input_splits, output_splits, ctx.comm, "backward of the FP8 dispatch all-to-all")
        return grad, None, None, None


def fp8_all_to_all(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], comm: Comm) -> torch.Tensor:
    """Like ``all_to_all``, the rows quantized to FP8 on the way (straight-through gradient)."""
    return _FP8AllToAll.apply(x_ND, output_splits, input_splits, comm)
