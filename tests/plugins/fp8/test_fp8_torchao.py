"""Cross-check of the tensorwise and rowwise recipes against torchao's Float8Linear (emulate=True).

Both use E4M3 for every operand here (torchao's default grad dtype is overridden). Measured: rowwise
(power-of-two scales) agrees exactly; tensorwise to ~1e-7 relative (torchao multiplies by
448 / amax where we divide by amax / 448, a float32 rounding apart), against FP8's own ~3.5e-2 error
to the exact product: a real check of the scale groups, the three GEMMs and their operands.
"""

from __future__ import annotations

import pytest
import torch
from dsv3_lightning.plugins.fp8 import FP8Recipe, fp8_linear

torchao_float8 = pytest.importorskip("torchao.float8")


def torchao_config(granularity, pow2: bool):
    cast = torchao_float8.CastConfig(scaling_granularity=granularity, target_dtype=torch.float8_e4m3fn)
    return torchao_float8.Float8LinearConfig(
        cast_config_input=cast, cast_config_weight=cast, cast_config_grad_output=cast,
        emulate=True, round_scales_to_power_of_2=pow2,
    )


@pytest.mark.parametrize(
    ("recipe", "granularity", "pow2"),
    [("tensorwise", "TENSORWISE", False), ("rowwise", "AXISWISE", True)],
)
def test_matches_torchao_float8_linear(recipe, granularity, pow2):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False)
    x = torch.randn(64, 256)
    dy = torch.randn(64, 128)
    config = torchao_config(getattr(torchao_float8.ScalingGranularity, granularity), pow2)
    reference = torchao_float8.convert_to_float8_training(torch.nn.Sequential(linear), config=config)
    x_ref = x.clone().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.backward(dy)

    w = linear.weight.detach().clone().requires_grad_()
    x_ours = x.clone().requires_grad_()
    y = fp8_linear(x_ours, w, FP8Recipe(recipe, pow2_scales=pow2))
    y.backward(dy)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(y, y_ref) < 1e-5
    assert rel(x_ours.grad, x_ref.grad) < 1e-5
    assert rel(w.grad, linear.weight.grad) < 1e-5
    exact = x @ linear.weight.detach().T
    assert 5e-3 < rel(y, exact) < 0.1  # both really are FP8
