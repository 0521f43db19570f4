"""FP8 (E4M3) quantizers: 1x128 tiles, 128x128 blocks, rows and whole tensors, all online max-abs.

A quantized matrix is a ``Quantized``: FP8 values ``q`` [R, Kp] and float32 scales ``s`` [R, Kp / block]
such that ``x ≈ q · s`` block by block along the inner (last) dimension K. One representation serves
every recipe, because a scaled GEMM only needs "a scale per row and per K-block" on each side:

    recipe      activations / gradients          weights
    blockwise   1x128 tiles: s [R, K/128]        128x128 blocks: s [R/128, K/128], stored expanded per row
    rowwise     one scale per row: s [R, 1]      one scale per row (output channel)
    tensorwise  one scale for all: s [R, 1]      one scale for all

Scales: s = max|x| / 448 over the tile (DeepSeek's act_quant, amax clamped to 1e-4 so that an
all-zero tile gets a finite scale), optionally rounded up to a power of two (2^ceil(log2 s), the
"ue8m0" format): then q · s is exact and rescaling never rounds. Values are x / s cast to
``float8_e4m3fn`` (round to nearest even), so |x - q·s| <= ulp_e4m3(|x| / s) · s / 2, i.e. a relative
error of at most 2^-4 for normal values, and an absolute error of at most s · 2^-10 for values that
land in E4M3's subnormal range.

K is zero-padded to a multiple of the block (zeros change no dot product); callers slice the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


@dataclass
class Quantized:
    q: torch.Tensor
    """FP8 values [R, Kp], Kp a multiple of ``block``."""
    s: torch.Tensor
    """float32 scales [R, Kp // block]: x[r, k] ≈ q[r, k] · s[r, k // block]."""
    block: int
    """Width of a scale group along K."""

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.s.repeat_interleave(self.block, dim=1)).to(dtype)

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.s.numel() * self.s.element_size()


def _scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = amax.float().clamp_min(AMAX_FLOOR) / FP8_MAX
    return torch.exp2(torch.ceil(torch.log2(scale))) if pow2 else scale


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return F.pad(x, (0, pad)) if pad else x


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # |x / s| <= 448 by construction; the clamp only guards the last ulp of the division.
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_tiles(x_RK: torch.Tensor, block: int = 128, *, pow2: bool = False) -> Quantized:
    """1 x ``block`` tiles along K (DeepSeek's activations and activation gradients)."""
    x = _pad_last(x_RK, block)
    tiles = x.unflatten(-1, (-1, block))  # [R, K/b, b]
    scale = _scale(tiles.abs().amax(-1), pow2)  # [R, K/b]
    return Quantized(_cast(tiles, scale[..., None]).flatten(-2), scale, block)


def quantize_blocks(w_RK: torch.Tensor, block: int = 128, *, pow2: bool = False) -> Quantized:
    """``block`` x ``block`` blocks (DeepSeek's weights); rows padded to a multiple of the block too."""
    w = _pad_last(w_RK, block)
    rows = w.shape[0]
    w = F.pad(w, (0, 0, 0, -rows % block))
    blocks = w.unflatten(0, (-1, block)).unflatten(-1, (-1, block))  # [R/b, b, K/b, b]
    scale = _scale(blocks.abs().amax(dim=(1, 3)), pow2)  # [R/b, K/b]
    q = _cast(blocks, scale[:, None, :, None]).flatten(2).flatten(0, 1)[:rows]
    return Quantized(q, scale.repeat_interleave(block, dim=0)[:rows], block)


def quantize_rows(x_RK: torch.Tensor, *, pow2: bool = False) -> Quantized:
    """One scale per row over all of K (the rowwise recipe)."""
    scale = _scale(x_RK.abs().amax(-1, keepdim=True), pow2)
    return Quantized(_cast(x_RK, scale), scale, x_RK.shape[-1])


def quantize_tensor(x_RK: torch.Tensor, *, pow2: bool = False) -> Quantized:
    """One scale for the whole tensor (the tensorwise recipe), stored per row."""
    scale = _scale(x_RK.abs().amax(), pow2).expand(x_RK.shape[0], 1).contiguous()
    return Quantized(_cast(x_RK, scale), scale, x_RK.shape[-1])


def block_scales(w: Quantized) -> torch.Tensor:
    """The [R/128, K/128] block scales of a ``quantize_blocks`` result (one row of each block)."""
    return w.s[:: w.block]


def e4m3_error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |x - dequant(quant(x))| that round-to-nearest E4M3 allows for each element.

    Half a unit in the last place of E4M3 at |x| / s (3 mantissa bits, exponent >= -6, subnormal
    step 2^-9), times s.
    """
    y = (x.float() / scale).abs().clamp_min(2.0**-6)
    ulp = torch.exp2(torch.floor(torch.log2(y)) - 3)
    return ulp / 2 * scale


__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "Quantized",
    "block_scales",
    "e4m3_error_bound",
    "quantize_blocks",
    "quantize_rows",
    "quantize_tensor",
    "quantize_tiles",
]
