"""Rotary position embedding with YaRN, in DeepSeek's interleaved-pair layout (SPEC.md §3.1).

RoPE here touches only the decoupled parts of MLA: the per-head RoPE query q^R and the one RoPE key
k^R shared by all heads. Frequency i (i < d_h^R / 2) rotates the *adjacent* pair (x[2i], x[2i+1]),
which is how DeepSeek's released weights are laid out; the rotated output keeps that layout (Hugging
Face writes it de-interleaved, which changes no dot product).

YaRN (when ``config.rope_scaling`` is set) blends each frequency between its original value
(extrapolation, high frequencies) and value/s (interpolation, low frequencies) with a linear ramp over
the correction range [floor(dim(β_fast)), ceil(dim(β_slow))], and multiplies cos/sin by an attention
factor. As in Hugging Face, YaRN applies at every length once configured; DeepSeek's reference turns
it on only for max_seq_len > 4096. The softmax temperature mscale² lives in ``ModelConfig.softmax_scale``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3_lightning.config import ModelConfig, YarnRopeScaling


def rope_inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, [d_h^R / 2]) and the cos/sin attention factor."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    yarn = config.rope_scaling
    if yarn is None:
        return inv_freq, 1.0

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(base)
        )

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-empty range
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / yarn.factor * ramp + inv_freq * (1 - ramp)
    if yarn.mscale and yarn.mscale_all_dim:
        factor = YarnRopeScaling.get_mscale(yarn.factor, yarn.mscale) / YarnRopeScaling.get_mscale(
            yarn.factor, yarn.mscale_all_dim
        )
    else:
        factor = YarnRopeScaling.get_mscale(yarn.factor)
    return inv_freq, factor


class RotaryEmbedding(nn.Module):
    """Maps positions to (cos, sin), each [..., d_h^R / 2] in float32."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self, device: torch.device) -> None:
        """Recomputes ``inv_freq`` on ``device`` (a model materialised from the meta device has none)."""
        self.inv_freq = rope_inverse_frequencies(self.config)[0].to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.float()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotates pairs of the last dim of ``x`` [B, S, heads, d_h^R] by cos/sin [(B,) S, d_h^R/2].

    ``interleaved`` (``config.rope_interleave``): pair i is (x[2i], x[2i+1]) and the output keeps that
    layout; otherwise pair i is (x[i], x[i + d/2]) (HF's ``rotate_half``) and the output keeps halves.
    """
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
