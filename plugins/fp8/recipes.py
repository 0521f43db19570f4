"""FP8 recipes: how activations, gradients and weights are grouped under one scale.

- ``blockwise`` (DeepSeek-V3): activations and activation gradients in 1x128 tiles along the GEMM's
  inner dimension, weights in 128x128 blocks. In backward the weight is re-quantized transposed
  (its 128x128 blocks transpose exactly), and for Wgrad both the output gradient and the saved FP8
  activation are re-tiled 128x1, i.e. 1x128 along the token dimension, which is the inner one there.
- ``rowwise``: one scale per row of every operand (per token, per output channel).
- ``tensorwise``: one scale per tensor.

Every recipe uses E4M3 for all three GEMMs (DeepSeek uses no E5M2) and online max-abs scaling;
``pow2_scales`` rounds every scale up to a power of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from dsv3_lightning.plugins.fp8.quant import (
    Quantized,
    quantize_blocks,
    quantize_rows,
    quantize_tensor,
    quantize_tiles,
)

Recipe = Literal["blockwise", "rowwise", "tensorwise"]
"""The built-in recipes (``--help`` lists them); a subclass's ``build_recipe`` may add its own."""
RECIPES: tuple[str, ...] = get_args(Recipe)


@dataclass(frozen=True)
class FP8Recipe:
    name: str = "blockwise"
    pow2_scales: bool = False
    block: int = 128

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(
                f"trainer.plugins[FP8Precision].recipe ({self.name!r}) is not a recipe; choose one of {', '.join(RECIPES)}"
            )

    def activation(self, x_RK: torch.Tensor, backend: str = "torch") -> Quantized:
        """An operand whose rows are tokens (or, in Wgrad, channels over tokens)."""
        if self.name == "blockwise" and backend == "triton":
            from dsv3_lightning.plugins.fp8.triton_kernels import act_quant

            return act_quant(x_RK, self.block, pow2=self.pow2_scales)
        if self.name == "blockwise":
            return quantize_tiles(x_RK, self.block, pow2=self.pow2_scales)
        if self.name == "rowwise":
            return quantize_rows(x_RK, pow2=self.pow2_scales)
        return quantize_tensor(x_RK, pow2=self.pow2_scales)

    def weight(self, w_RK: torch.Tensor, backend: str = "torch") -> Quantized:
        if self.name == "blockwise" and backend == "triton":
            from dsv3_lightning.plugins.fp8.triton_kernels import weight_quant

            return weight_quant(w_RK, self.block, pow2=self.pow2_scales)
        if self.name == "blockwise":
            return quantize_blocks(w_RK, self.block, pow2=self.pow2_scales)
        if self.name == "rowwise":
            return quantize_rows(w_RK, pow2=self.pow2_scales)
        return quantize_tensor(w_RK, pow2=self.pow2_scales)
