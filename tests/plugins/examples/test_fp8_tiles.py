"""The 1 x 32 tile FP8 example: its quantization, its GEMM, and a run from plugins/examples/fp8_tiles.yaml."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from dsv3_lightning.plugins.examples.fp8_tiles import TilePrecision, TileRecipe
from dsv3_lightning.plugins.fp8 import FP8GroupedExperts, FP8Linear, FP8Recipe, fp8_linear


def test_both_operands_in_tiles_with_power_of_two_scales():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    for quantized in (TileRecipe().weight(w), TileRecipe().activation(w)):
        assert quantized.block == 32 and quantized.s.shape == (64, 3)  # a scale per row per 32 columns
        assert torch.equal(quantized.s, torch.exp2(torch.log2(quantized.s).round()))
        # E4M3 rounding: relative error at most 2^-4, plus subnormal slack s · 2^-10
        bound = w.abs() * 2**-4 + quantized.s.repeat_interleave(32, dim=1)[:, :96] * 2**-10
        assert ((quantized.dequantize()[:, :96] - w).abs() <= bound).all()


def test_small_tiles_isolate_an_outlier():
    """A weight 10^5 times the others pushes its whole 128x128 block under V3's recipe into E4M3's
    subnormal range (relative error about 50%), only its 1x32 tile here (the rest keeps about 2%)."""
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(1)) * 0.01
    w[5, 7] = 1000.0
    others = torch.ones_like(w, dtype=torch.bool)
    others[5, 7] = False
    error = {
        name: ((recipe.weight(w).dequantize() - w).abs() / w.abs())[others].mean().item()
        for name, recipe in {"tiles": TileRecipe(), "blocks": FP8Recipe("blockwise", pow2_scales=True)}.items()
    }
    assert error["tiles"] < 0.05
    assert error["blocks"] > 0.25


def test_linear_close_to_float32_forward_and_backward():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    y = fp8_linear(x, w, TileRecipe())
    y.square().sum().backward()
    ref_x, ref_w = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref = ref_x @ ref_w.T
    ref.square().sum().backward()
    for ours, theirs in ((y, ref), (x.grad, ref_x.grad), (w.grad, ref_w.grad)):
        assert (ours - theirs).norm() / theirs.norm() < 0.1  # three E4M3 GEMMs (about 2^-4 each)


def test_only_the_torch_backend():
    with pytest.raises(NotImplementedError, match=r"TilePrecision\].backend \('triton'\).*set backend: torch"):
        TilePrecision(backend="triton")
    with pytest.raises(ValueError, match=r"TilePrecision\].block \(0\) must be a positive"):
        TilePrecision(block=0)


def test_runs_from_yaml(fit_example):
    cli = fit_example("fp8_tiles.yaml", 2)
    plugin = cli.trainer.precision_plugin
    assert type(plugin) is TilePrecision and type(plugin.recipe) is TileRecipe and plugin.recipe.block == 32
    converted = [m for m in cli.model.modules() if isinstance(m, (FP8Linear, FP8GroupedExperts))]
    assert len(converted) == len(plugin.converted) > 0
    assert all(m.recipe is plugin.recipe for m in converted)
    assert cli.trainer.global_step == 2
    with open(f"{cli.trainer.logger.log_dir}/metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
