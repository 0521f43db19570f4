"""Example: an FP8 recipe with another tile size, by subclassing the FP8 recipe and precision plugin.

DeepSeek-V3 scales activations in 1x128 tiles and weights in 128x128 blocks. This recipe scales both
operands of every GEMM in 1 x ``block`` tiles along the inner dimension (32 by default), weights
included, with power-of-two scales: the layout of the OCP Microscaling (MX) formats, whose FP8
variant has one 8-bit exponent per 32 elements. An outlier then shares its scale with 31 values
instead of 127 (activations) or 16,383 (a weight block), so fewer small values fall into E4M3's
subnormal range or to zero, at the cost of 4x more activation scales and 32x more weight scales
per row block. It is MX-like, not MX bit for bit (the scale is the power of two at or above
amax / 448, as ``pow2_scales`` everywhere in this plugin).

Two subclasses, each overriding documented methods only:

- ``TileRecipe(FP8Recipe)``: ``activation`` and ``weight`` both quantize 1 x ``block`` tiles
  (``quantize_tiles``); its ``name`` stays ``blockwise``, the family whose scales are per K-group,
  so the plugin's alignment check (``unaligned``) and saved-bytes report use its ``block``.
- ``TilePrecision(FP8Precision)``: ``build_recipe`` returns a ``TileRecipe``. Only the portable
  ``torch`` backend runs it: the Triton kernels and ``torch._scaled_mm`` implement the built-in
  layouts.

    dsv3 fit --config configs/tiny.yaml --config plugins/examples/fp8_tiles.yaml
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dsv3_lightning.plugins.fp8 import FP8Precision, FP8Recipe, Quantized, quantize_tiles
from typing_extensions import override

_KEY = "trainer.plugins[TilePrecision]"


@dataclass(frozen=True)
class TileRecipe(FP8Recipe):
    """1 x ``block`` tiles along K for activations, gradients and weights alike."""

    name: str = "blockwise"
    pow2_scales: bool = True
    block: int = 32

    @override
    def activation(self, x_RK: torch.Tensor, backend: str = "torch") -> Quantized:
        return quantize_tiles(x_RK, self.block, pow2=self.pow2_scales)

    @override
    def weight(self, w_RK: torch.Tensor, backend: str = "torch") -> Quantized:
        return quantize_tiles(w_RK, self.block, pow2=self.pow2_scales)


class TilePrecision(FP8Precision):
    """``FP8Precision`` with the ``TileRecipe``: every eligible GEMM in E4M3, 1 x ``block`` tiles.

    Args:
        block: The tile width along the inner dimension (32 in the MX formats, 128 in DeepSeek-V3).
        pow2_scales: Round every scale up to a power of two (MX's 8-bit exponent scales).
        backend: ``torch`` only (see the module docstring).
        unaligned: ``pad`` or ``skip`` layers whose dimensions are not multiples of ``block``.
        exclude: Extra module-name patterns (fnmatch) to keep in high precision.
    """

    def __init__(
        self,
        block: int = 32,
        *,
        pow2_scales: bool = True,
        backend: str = "torch",
        unaligned: str = "pad",
        exclude: list[str] | None = None,
    ) -> None:
        if block < 1:
            raise ValueError(f"{_KEY}.block ({block}) must be a positive tile width, e.g. 32")
        if backend != "torch":
            raise NotImplementedError(
                f"{_KEY}.backend ({backend!r}): the 1 x {block} tile recipe runs on the portable 'torch' "
                "backend only; set backend: torch"
            )
        self.block = block
        super().__init__("blockwise", backend=backend, pow2_scales=pow2_scales, unaligned=unaligned, exclude=exclude)

    @override
    def build_recipe(self, recipe: str, *, pow2_scales: bool) -> FP8Recipe:
        return TileRecipe(pow2_scales=pow2_scales, block=self.block)
