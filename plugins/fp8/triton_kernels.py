"""Triton kernels for the blockwise recipe: tile and block quantization, the block-scaled FP8 GEMM.

They compute exactly what ``quant.py`` and ``gemm.py`` compute in PyTorch (the tests hold them to it
under ``TRITON_INTERPRET=1`` on CPU), in single passes on the GPU:

- ``act_quant``: one program per 1x128 tile: amax, scale = max(amax, 1e-4) / 448 (optionally 2^ceil),
  values x / scale cast to E4M3.
- ``weight_quant``: one program per 128x128 block, edges masked (as DeepSeek's weight_dequant).
- ``blockwise_matmul_triton``: C = A·Bᵀ with A [M, K] FP8 and per-(row, K-block) scales, B [N, K] FP8
  and per-(row, K-block) scales (a weight's 128x128 block scales repeated over its rows). BLOCK_K is
  the scale block, 128: each K step is one FP8 tensor-core dot whose float32 result is multiplied by
  the two scales and added to a float32 accumulator: DeepSeek's promotion every N_C = 128 elements.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from dsv3_lightning.plugins.fp8.quant import FP8_DTYPE, Quantized


@triton.jit
def _round_to_e4m3(y):
    """Rounds float32 |y| <= 448 to the E4M3 grid, to nearest even, so that the cast after it is exact.

    Adding and subtracting 1.5 · 2^(e + 20) rounds y to a multiple of 2^(e - 3), E4M3's spacing in the
    binade 2^e (e >= -6; 2^-9 below, the subnormals). The explicit rounding keeps the kernels
    bit-identical to torch's cast everywhere: Triton's CPU interpreter misrounds float32 -> float8
    just below powers of two (seen with triton 3.6).
    """
    a = tl.abs(y)
    e = tl.maximum(tl.floor(tl.log2(a)), -6.0)
    magic = tl.exp2(e + 20.0) * 1.5
    r = (a + magic) - magic
    return tl.where(y < 0, -r, r)  # keeps the sign of values that round to zero (-0.0, as torch)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, BLOCK: tl.constexpr, POW2: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x)), 1e-4) / 448.0
    if POW2:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    y = _round_to_e4m3(tl.clamp(x / scale, -448.0, 448.0))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty))
    tl.store(s_ptr + pid, scale)


def act_quant(x_RK: torch.Tensor, block: int = 128, *, pow2: bool = False) -> Quantized:
    """1 x ``block`` tile quantization of a 2-D tensor (K zero-padded to the block)."""
    pad = -x_RK.shape[1] % block
    x = torch.nn.functional.pad(x_RK, (0, pad)).contiguous() if pad else x_RK.contiguous()
    y = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(x.shape[0], x.shape[1] // block, dtype=torch.float32, device=x.device)
    _act_quant_kernel[(x.numel() // block,)](x, y, s, BLOCK=block, POW2=pow2)
    return Quantized(y, s, block)


@triton.jit
def _weight_quant_kernel(w_ptr, y_ptr, s_ptr, M, N, K_PADDED: tl.constexpr, BLOCK: tl.constexpr, POW2: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(w)), 1e-4) / 448.0
    if POW2:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    y = _round_to_e4m3(tl.clamp(w / scale, -448.0, 448.0))
    out_mask = (rows[:, None] < M) & (cols[None, :] < K_PADDED)
    tl.store(y_ptr + rows[:, None] * K_PADDED + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)
    tl.store(s_ptr + pid_m * tl.num_programs(1) + pid_n, scale)


def weight_quant(w_RK: torch.Tensor, block: int = 128, *, pow2: bool = False) -> Quantized:
    """``block`` x ``block`` quantization of a 2-D weight; the result matches ``quant.quantize_blocks``."""
    w = w_RK.contiguous()
    M, N = w.shape
    grid = (triton.cdiv(M, block), triton.cdiv(N, block))
    k_padded = grid[1] * block
    y = torch.zeros(M, k_padded, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty(grid, dtype=torch.float32, device=w.device)
    _weight_quant_kernel[grid](w, y, s, M, N, k_padded, BLOCK=block, POW2=pow2)
    return Quantized(y, s.repeat_interleave(block, dim=0)[:M], block)


def _gemm_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)
        for bm in (64, 128)
        for bn in (64, 128)
        for stages, warps in ((3, 4), (4, 8))
    ]


@triton.jit
def _blockwise_gemm_kernel(
    a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    k_blocks = K // BLOCK_K
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * K + ks[None, :]
    b_ptrs = b_ptr + cols[:, None] * K + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(K // BLOCK_K):  # K is a compile-time constant: one kernel per model width
        a = tl.load(a_ptrs, mask=rows[:, None] < M, other=0.0)
        b = tl.load(b_ptrs, mask=cols[:, None] < N, other=0.0)
        a_s = tl.load(a_s_ptr + rows * k_blocks + kb, mask=rows < M, other=0.0)
        b_s = tl.load(b_s_ptr + cols * k_blocks + kb, mask=cols < N, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + rows[:, None] * N + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def blockwise_matmul_triton(a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C = A·Bᵀ from two ``Quantized`` operands with 128-wide K blocks (see the module docstring)."""
    if a.block != 128 or b.block != 128 or a.q.shape[1] != b.q.shape[1]:
        raise ValueError("the Triton FP8 GEMM takes 128-wide K blocks on both operands and equal K")
    M, K = a.q.shape
    N = b.q.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a.q.device)
    args = (a.q.contiguous(), b.q.contiguous(), c, a.s.contiguous(), b.s.contiguous(), M, N, K)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter cannot autotune (no device timer)
        grid = (triton.cdiv(M, 64), triton.cdiv(N, 64))
        _blockwise_gemm_kernel[grid](*args, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
        _autotuned_gemm()[grid](*args, BLOCK_K=128)
    return c


@functools.cache
def _autotuned_gemm():
    return triton.autotune(configs=_gemm_configs(), key=["M", "N", "K"])(_blockwise_gemm_kernel)


__all__ = ["act_quant", "blockwise_matmul_triton", "weight_quant"]
