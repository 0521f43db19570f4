"""FP8 training with DeepSeek-V3's fine-grained quantization (SPEC.md §6).

- ``FP8Precision``: the Lightning Precision plugin (``trainer.plugins``) that converts the model.
- ``FP8Recipe`` and the quantizers (``quant.py``): 1x128 tiles, 128x128 blocks, rows, tensors.
- ``fp8_linear`` / ``FP8Linear`` (``linear.py``): Fprop, Dgrad and Wgrad in E4M3, FP8 saved activations.
- ``FP8GroupedExperts`` (``experts.py``): the routed experts through the grouped-matmul seam.
- ``AdamWBF16`` (``optim.py``): AdamW with bfloat16 moments and float32 master weights.
- ``triton_kernels.py``: GPU kernels (tile and block quantization, block-scaled GEMM).
- ``checkpoint.py``: DeepSeek's FP8 checkpoint format (``weight_scale_inv``), both directions.
"""

from dsv3_lightning.plugins.fp8.checkpoint import dequantize_checkpoint, quantize_checkpoint
from dsv3_lightning.plugins.fp8.experts import FP8GroupedExperts
from dsv3_lightning.plugins.fp8.linear import FP8Linear, fp8_linear, saved_bytes
from dsv3_lightning.plugins.fp8.optim import AdamWBF16
from dsv3_lightning.plugins.fp8.precision import FP8Precision
from dsv3_lightning.plugins.fp8.quant import (
    Quantized,
    quantize_blocks,
    quantize_rows,
    quantize_tensor,
    quantize_tiles,
)
from dsv3_lightning.plugins.fp8.recipes import FP8Recipe

__all__ = [
    "AdamWBF16",
    "FP8GroupedExperts",
    "FP8Linear",
    "FP8Precision",
    "FP8Recipe",
    "Quantized",
    "dequantize_checkpoint",
    "fp8_linear",
    "quantize_blocks",
    "quantize_checkpoint",
    "quantize_rows",
    "quantize_tensor",
    "quantize_tiles",
    "saved_bytes",
]
