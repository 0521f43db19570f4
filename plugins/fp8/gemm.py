"""Scaled FP8 matrix products C = A · Bᵀ with float32 accumulation, and their backends.

Both operands are ``Quantized`` along the same inner dimension K with the same block width, so the
product is, for every K-block k,

    C += (A_q[:, k] · B_q[:, k]ᵀ) ⊙ (a_s[:, k] ⊗ b_s[:, k])          (accumulated in float32)

which is DeepSeek's promotion rule: every 128 elements of K the partial sum is scaled and added in
float32, so FP8's short accumulator never sees more than one block.

Backends:
- ``torch`` (portable, every device, what CI tests): the FP8 values are exact in float32, so
  dequantizing each operand (q · s per block) and running one float32 matmul computes the same sum
  of exact products; only the order of float32 roundings differs from a fused kernel.
- ``scaled_mm``: ``torch._scaled_mm`` for one scale per row and column (rowwise, tensorwise).
- ``triton``: the block-scaled kernel of ``triton_kernels.py`` (CUDA; CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
from dsv3_lightning.plugins.fp8.quant import Quantized


def _check(a: Quantized, b: Quantized) -> None:
    if a.q.shape[1] != b.q.shape[1] or a.block != b.block:
        raise ValueError(
            f"scaled matmul needs the same inner dimension and K-block on both sides, got "
            f"{tuple(a.q.shape)}/{a.block} and {tuple(b.q.shape)}/{b.block}"
        )


def scaled_matmul_torch(a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    _check(a, b)
    return (a.dequantize() @ b.dequantize().T).to(out_dtype)


def scaled_matmul_scaled_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch._scaled_mm`` with a scale per row of A and per row of B (one K-block)."""
    _check(a, b)
    if a.s.shape[1] != 1:
        raise ValueError("torch._scaled_mm takes one scale per row and column: use it for rowwise or tensorwise")
    if a.s.unique().numel() == 1 and b.s.unique().numel() == 1:  # tensorwise: scalar scales
        scale_a, scale_b = a.s[:1, :1].reshape(()), b.s[:1, :1].reshape(())
    else:
        scale_a, scale_b = a.s.contiguous(), b.s.T.contiguous()
    return torch._scaled_mm(a.q, b.q.T, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def scaled_matmul(a: Quantized, b: Quantized, backend: str = "torch", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if backend == "torch":
        return scaled_matmul_torch(a, b, out_dtype)
    if backend == "scaled_mm":
        return scaled_matmul_scaled_mm(a, b, out_dtype)
    if backend == "triton":
        from dsv3_lightning.plugins.fp8.triton_kernels import blockwise_matmul_triton

        return blockwise_matmul_triton(a, b, out_dtype)
    raise ValueError(f"unknown FP8 GEMM backend {backend!r}")


__all__ = ["scaled_matmul", "scaled_matmul_scaled_mm", "scaled_matmul_torch"]
