"""FP8 on a GPU: correctness of the Triton kernels there, and GEMM speed against bf16.

    PYTHONPATH=src python benchmarks/fp8_gemm_gpu.py [--out DIR]

1. Correctness on the device: act_quant / weight_quant bit-identical to the PyTorch quantizers; the
   block-scaled GEMM against float64 math on the dequantized operands (‖out − ref‖ / ‖ref‖).
2. Speed at DeepSeek-V3's shapes (M = 4096 tokens; K, N from the MLP and expert projections), median
   of triton.testing.do_bench, in TFLOP/s (2·M·N·K / t):
   - bf16: torch.matmul (cuBLAS), the peer;
   - fp8 rowwise: torch._scaled_mm, cuBLAS's FP8 GEMM with one scale per row and column;
   - fp8 blockwise (ours): the Triton block-scaled GEMM on pre-quantized operands;
   - fp8 blockwise + quant: the same plus quantizing the activation (1x128) and the weight (128x128).
3. One linear layer forward + backward (M=4096, K=7168, N=2048): bf16 nn.functional.linear against
   fp8_linear with the Triton backend (all three GEMMs and all quantization in FP8 kernels).
Needs CUDA and triton; runs from the source tree (no install, no jsonargparse).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def use_source_tree() -> None:
    """Makes ``dsv3_lightning`` (src/) and ``dsv3_lightning.plugins`` (plugins/) importable uninstalled."""
    sys.path.insert(0, str(ROOT / "src"))
    import dsv3_lightning

    spec = importlib.util.spec_from_file_location(
        "dsv3_lightning.plugins", ROOT / "plugins" / "__init__.py", submodule_search_locations=[str(ROOT / "plugins")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["dsv3_lightning.plugins"] = module
    spec.loader.exec_module(module)
    dsv3_lightning.plugins = module


SHAPES = [  # (name, M, K, N)
    ("MLP up/gate   K=7168  N=2048 ", 4096, 7168, 2048),
    ("MLP up/gate   K=7168  N=18432", 4096, 7168, 18432),
    ("dense down    K=18432 N=7168 ", 4096, 18432, 7168),
    ("expert down   K=2048  N=7168 ", 4096, 2048, 7168),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    use_source_tree()
    import triton
    from dsv3_lightning.plugins.fp8 import FP8Recipe, fp8_linear
    from dsv3_lightning.plugins.fp8.gemm import scaled_matmul_scaled_mm
    from dsv3_lightning.plugins.fp8.quant import quantize_blocks, quantize_rows, quantize_tiles
    from dsv3_lightning.plugins.fp8.triton_kernels import act_quant, blockwise_matmul_triton, weight_quant
    from triton.testing import do_bench

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    results: dict = {"device": name, "torch": torch.__version__, "triton": triton.__version__}

    # ---------------------------------------------------------------- correctness on the device
    checks = {}
    for trial in range(3):
        g = torch.Generator(device=dev).manual_seed(trial)
        x = torch.randn(1000, 7168, device=dev, generator=g)
        x[torch.rand(x.shape, device=dev, generator=g) < 0.01] *= 30
        w = torch.randn(2000, 7168, device=dev, generator=g) * 0.02
        a, ra = act_quant(x), quantize_tiles(x)
        b, rb = weight_quant(w), quantize_blocks(w)
        checks.setdefault("act_quant bit-identical", []).append(
            torch.equal(a.q.view(torch.uint8), ra.q.view(torch.uint8)) and torch.equal(a.s, ra.s))
        checks.setdefault("weight_quant bit-identical", []).append(
            torch.equal(b.q.view(torch.uint8), rb.q.view(torch.uint8)) and torch.equal(b.s, rb.s))
        c = torch.full((1000, 2000), float("nan"), device=dev)
        c = blockwise_matmul_triton(a, b)
        ref = a.dequantize(torch.float64) @ b.dequantize(torch.float64).T
        checks.setdefault("gemm rel. error vs float64 (same FP8 operands)", []).append(
            ((c.double() - ref).norm() / ref.norm()).item())
        full = x.double() @ w.double().T
        checks.setdefault("gemm rel. error vs float64 (unquantized inputs)", []).append(
            ((c.double() - full).norm() / full.norm()).item())
    for key, values in checks.items():
        print(f"  {key}: {values}")
    results["checks"] = checks

    # ---------------------------------------------------------------- GEMM speed
    rows = []
    for label, M, K, N in SHAPES:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        flops = 2 * M * N * K
        a, b = act_quant(x), weight_quant(w)
        ar, br = quantize_rows(x), quantize_rows(w)
        timings = {
            "bf16 cuBLAS": do_bench(lambda: x @ w.T, return_mode="median"),
            "fp8 rowwise _scaled_mm": do_bench(lambda: scaled_matmul_scaled_mm(ar, br, torch.bfloat16), return_mode="median"),
            "fp8 blockwise (ours)": do_bench(lambda: blockwise_matmul_triton(a, b, torch.bfloat16), return_mode="median"),
            "fp8 blockwise + quant": do_bench(
                lambda: blockwise_matmul_triton(act_quant(x), weight_quant(w), torch.bfloat16), return_mode="median"),
        }
        row = {"shape": label, "M": M, "K": K, "N": N,
               **{k: flops / (ms * 1e-3) / 1e12 for k, ms in timings.items()}}
        rows.append(row)
        print("  " + label + "  " + "  ".join(f"{k}: {v:.0f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    results["gemm_tflops"] = rows

    # ---------------------------------------------------------------- one linear, forward + backward
    M, K, N = 4096, 7168, 2048
    x = torch.randn(M, K, device=dev, requires_grad=True)
    w = (torch.randn(N, K, device=dev) * 0.02).requires_grad_()
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    dy = torch.randn(M, N, device=dev)

    def bf16_step():
        y = torch.nn.functional.linear(xb, wb)
        y.backward(dy.bfloat16())

    def fp8_step():
        y = fp8_linear(x, w, FP8Recipe(), "triton")
        y.backward(dy)

    layer = {"bf16 fwd+bwd ms": do_bench(bf16_step, return_mode="median"),
             "fp8 blockwise fwd+bwd ms": do_bench(fp8_step, return_mode="median")}
    results["linear_fwd_bwd"] = layer
    print(f"  linear {M}x{K}->{N} forward+backward: " + ", ".join(f"{k} {v:.3f}" for k, v in layer.items()))

    print(f"\n{name}: TFLOP/s, median of triton.testing.do_bench, M = 4096\n")
    keys = [k for k in rows[0] if k not in ("shape", "M", "K", "N")]
    print("| shape | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        print(f"| {row['shape'].strip()} | " + " | ".join(f"{row[k]:.0f}" for k in keys) + " |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fp8_gemm_gpu.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
