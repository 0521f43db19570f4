"""The Triton kernels compute what the portable PyTorch path computes (CPU: TRITON_INTERPRET=1)."""


from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, tests/conftest.py selects Triton's CPU interpreter

from dsv3_lightning.plugins.fp8 import FP8Recipe, fp8_linear
from dsv3_lightning.plugins.fp8.gemm import scaled_matmul_torch
from dsv3_lightning.plugins.fp8.quant import quantize_blocks, quantize_tiles
from dsv3_lightning.plugins.fp8.triton_kernels import act_quant, blockwise_matmul_triton, weight_quant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    x[torch.rand(*shape, generator=g) < 0.01] *= 30
    return x.to(DEVICE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical FP8 values; on CUDA identical bits. (The interpreter turns -0.0 into +0.0 when it casts.)"""
    if a.is_cuda:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a.float(), b.float())


@pytest.mark.parametrize("pow2", [False, True])
def test_act_quant_is_bit_identical(pow2):
    x = rand(48, 300)
    ours, ref = act_quant(x, pow2=pow2), quantize_tiles(x, pow2=pow2)
    assert same_bits(ours.q, ref.q) and torch.equal(ours.s, ref.s)


@pytest.mark.parametrize("shape", [(200, 300), (256, 128), (130, 129)])
def test_weight_quant_is_bit_identical(shape):
    w = rand(*shape, seed=1, scale=0.05)
    ours, ref = weight_quant(w), quantize_blocks(w)
    assert same_bits(ours.q, ref.q) and torch.equal(ours.s, ref.s)


def test_blockwise_gemm_matches_portable_path():
    a, b = quantize_tiles(rand(70, 384, seed=2)), quantize_blocks(rand(200, 384, seed=3, scale=0.05))
    out, ref = blockwise_matmul_triton(a, b), scaled_matmul_torch(a, b)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_fp8_linear_with_triton_backend_matches_torch_backend():
    x = rand(64, 256, seed=4).requires_grad_()
    w = rand(128, 256, seed=5, scale=0.05).requires_grad_()
    dy = rand(64, 128, seed=6)
    grads = []
    for backend in ("triton", "torch"):
        y = fp8_linear(x, w, FP8Recipe(), backend)
        gx, gw = torch.autograd.grad(y, (x, w), dy)
        grads.append((y, gx, gw))
    for ours, ref in zip(*grads):
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
