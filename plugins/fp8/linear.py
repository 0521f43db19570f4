"""The FP8 linear map: all three GEMMs (Fprop, Dgrad, Wgrad) in E4M3, activations saved in FP8.

    Fprop   y  = x · Wᵀ          x: activation tiles along K     W: weight blocks
    Dgrad   dx = dy · W          dy: activation tiles along N    Wᵀ: weight blocks (re-quantized)
    Wgrad   dW = dyᵀ · x         dyᵀ, xᵀ: activation tiles along the tokens M (x from its FP8 copy)

Only the FP8 copy of x (values and scales) is kept for backward, not x itself: the saved-activation
memory of the layer is ``saved_bytes`` instead of 4 bytes per element in float32. The master weight
stays in its own precision (float32 here); gradients come out in float32.

``FP8Linear`` is an ``nn.Linear`` (same ``weight`` Parameter, same state-dict key) whose forward
runs this function, so a converted model saves and loads exactly like the original. ``fp8_linear``
is the function itself, used by the grouped experts too.
"""

from __future__ import annotations

import torch
from dsv3_lightning.plugins.fp8.gemm import scaled_matmul
from dsv3_lightning.plugins.fp8.quant import Quantized
from dsv3_lightning.plugins.fp8.recipes import FP8Recipe
from torch import nn


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe, backend: str) -> torch.Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        x_MK = x.reshape(-1, K)
        xq = recipe.activation(x_MK, backend)
        y_MN = scaled_matmul(xq, recipe.weight(weight, backend), backend)
        ctx.save_for_backward(xq.q, xq.s, weight)
        ctx.block, ctx.recipe, ctx.backend, ctx.in_dtype = xq.block, recipe, backend, x.dtype
        return y_MN.reshape(*lead, weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, s, weight = ctx.saved_tensors
        recipe, backend = ctx.recipe, ctx.backend
        N, K = weight.shape
        dy_MN = dy.reshape(-1, N)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx_MK = scaled_matmul(recipe.activation(dy_MN, backend), recipe.weight(weight.T, backend), backend)
            dx = dx_MK.reshape(*dy.shape[:-1], K).to(ctx.in_dtype)
        if ctx.needs_input_grad[1]:
            x_MK = Quantized(q, s, ctx.block).dequantize()[:, :K]
            dw = scaled_matmul(
                recipe.activation(dy_MN.T, backend), recipe.activation(x_MK.T, backend), backend
            ).to(weight.dtype)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe, backend: str = "torch") -> torch.Tensor:
    """``x @ weight.T`` with every GEMM in FP8 (forward and backward)."""
    return _FP8LinearFunction.apply(x, weight, recipe, backend)


def saved_bytes(tokens: int, in_features: int, recipe: FP8Recipe) -> int:
    """Bytes an FP8 linear keeps for backward for ``tokens`` rows of input (FP8 values plus scales)."""
    padded = -(-in_features // recipe.block) * recipe.block if recipe.name == "blockwise" else in_features
    groups = padded // recipe.block if recipe.name == "blockwise" else 1
    return tokens * padded + tokens * groups * 4


class FP8Linear(nn.Linear):
    """A bias-free ``nn.Linear`` computed in FP8; build one with ``from_linear`` (shares the weight)."""

    recipe: FP8Recipe
    backend: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe, backend: str) -> FP8Linear:
        if linear.bias is not None:
            raise ValueError("FP8Linear supports bias-free linear layers only (DeepSeek-V3 has no linear biases)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", None)
        new.recipe, new.backend = recipe, backend
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.recipe, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}, backend={self.backend}"
