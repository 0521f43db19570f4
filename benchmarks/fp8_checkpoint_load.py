"""Time and peak memory to load a sharded block-FP8 checkpoint, against its size (issue 19).

Writes a synthetic checkpoint laid out as DeepSeek's and Kimi's FP8 releases are: every 2-D linear
weight of the layers in float8_e4m3fn with a float32 ``weight_scale_inv`` per 128x128 block, **each
scale in another shard than its weight** (found through model.safetensors.index.json), routers in
float32, embedding, head and norms in bf16. Then, each in a fresh process (so that ``ru_maxrss`` is
that method's own peak):

- ``from_pretrained``: ``DeepSeekV3.from_pretrained(path, dtype=...)``, the loader for training:
  every tensor dequantized block row by block row and converted to the model dtype as it is read;
- ``convert``: ``dsv3 convert path model.ckpt`` (file-backed buffers, then ``torch.save``);
- ``eager``: the baseline a non-streaming loader is: read every shard whole, then dequantize whole
  tensors (``fp8.float() * scale`` expanded to the weight's shape), then build the model.

Two peaks, both above the process's figures after imports: ``peak RSS`` (``ru_maxrss``), which also
counts the checkpoint's pages that safetensors maps from the page cache (clean, reclaimable, shared
with every other reader of the files), and ``peak anon``, the process's own memory (``RssAnon``
sampled every 2 ms), which is what a loader costs: the model's own bytes are its floor for the
in-memory loaders. Run: ``python benchmarks/fp8_checkpoint_load.py [--layers 6] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=1024, num_attention_heads=16,
    q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=16, num_experts_per_tok=4, first_k_dense_replace=1, max_position_embeddings=4096,
)  # fmt: skip


def status_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


class AnonPeak:
    """Samples RssAnon every 2 ms in a thread (torch's kernels release the GIL)."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = status_mib("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, status_mib("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_mib("RssAnon"))


def write_checkpoint(path: Path, layers: int, shard_bytes: int) -> dict:
    """One shard in memory at a time; scales go to the shard after their weight's."""
    from safetensors.torch import save_file

    from dsv3_lightning import DeepSeekV3
    from dsv3_lightning.config import ModelConfig
    from dsv3_lightning.hf import config_to_hf
    from dsv3_lightning.hf_experts import unstack

    config = ModelConfig(**SHAPE, num_hidden_layers=layers)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in unstack(DeepSeekV3(config).state_dict())}
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    pending_scales: dict = {}
    weight_map, size, total, params = {}, 0, 0, 0

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"  # renamed -of-N at the end
        save_file(shards[-1], str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shards[-1], name))
        shards[-1] = dict(pending_scales)  # the previous shard's scales open the next one
        pending_scales.clear()

    for key, (shape, _) in shapes.items():
        params += math.prod(shape)
        fp8 = key.startswith("model.layers.") and len(shape) == 2 and "mlp.gate." not in key
        if fp8:
            shards[-1][key] = (torch.randn(shape, generator=gen) * 64).to(torch.float8_e4m3fn)
            rows, cols = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
            pending_scales[key + "_scale_inv"] = torch.rand(rows, cols, generator=gen) * 1e-3
        elif "mlp.gate." in key:
            shards[-1][key] = torch.randn(shape, generator=gen) * 0.02  # float32 router
        else:
            shards[-1][key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = shards[-1][key].numel() * shards[-1][key].element_size()
        size += nbytes
        total += nbytes
        if size > shard_bytes:
            flush()
            size = 0
    shards[-1].update(pending_scales)
    pending_scales.clear()
    flush()
    files = sorted(set(weight_map.values()))
    # rename to the releases' model-0000i-of-0000n pattern
    renamed = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renamed.items():
        (path / old).rename(path / new)
    weight_map = {k: renamed[v] for k, v in weight_map.items()}
    scale_elsewhere = sum(
        1 for k, f in weight_map.items() if k.endswith("_scale_inv") and weight_map[k.removesuffix("_scale_inv")] != f
    )
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf = config_to_hf(config, dtype=torch.bfloat16)
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                 "activation_scheme": "dynamic"}  # fmt: skip
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    disk = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {"params": params, "disk_bytes": disk, "shards": len(files), "scales_in_other_shard": scale_elsewhere,
            "scales": sum(k.endswith("_scale_inv") for k in weight_map)}  # fmt: skip


def measure(method: str, path: Path, dtype: str) -> dict:
    """Runs in a child process: (seconds, peak RSS above the post-import RSS)."""
    import dsv3_lightning.convert  # noqa: F401  (imports before the baseline)
    from dsv3_lightning import DeepSeekV3

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base, base_anon = status_mib("VmRSS"), status_mib("RssAnon")
    sampler = AnonPeak()
    start = time.perf_counter()
    if method == "from_pretrained":
        model = DeepSeekV3.from_pretrained(path, dtype=getattr(torch, dtype))
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    elif method == "convert":
        from dsv3_lightning.convert import convert

        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            convert(str(path), f"{tmp}/model.ckpt")
        model_bytes = 0
    else:  # eager: every shard whole, then whole-tensor dequantization
        from safetensors.torch import load_file

        from dsv3_lightning.hf_experts import stack_state

        everything = {}
        for shard in sorted(path.glob("*.safetensors")):
            everything.update(load_file(shard))
        state = {}
        for key, t in everything.items():
            if key.endswith("_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                s = everything[key + "_scale_inv"]
                t = t.float() * s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            state[key] = t.to(getattr(torch, dtype)) if "e_score" not in key else t
        del everything
        state = stack_state(state)
        with torch.device("meta"):
            from dsv3_lightning.hf import read_config

            model = DeepSeekV3(read_config(path)[0])
        model.load_state_dict(state, assign=True)
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    seconds = time.perf_counter() - start
    anon = sampler.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "dtype": dtype, "seconds": seconds, "peak_above_import_mib": peak - base,
            "anon_above_import_mib": anon - base_anon, "model_mib": model_bytes / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--shard_mib", type=int, default=256)
    parser.add_argument("--keep", type=Path, default=None, help="write (or reuse) the checkpoint here")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args.child[2])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "fp8"
        info_file = path / "benchmark_info.json"
        if info_file.is_file():
            info = json.loads(info_file.read_text())
        else:
            info = write_checkpoint(path, args.layers, args.shard_mib * 2**20)
            info_file.write_text(json.dumps(info))
        print(f"checkpoint: {info['params'] / 1e6:.0f}M parameters, {info['disk_bytes'] / 2**20:.0f} MiB on disk in "
              f"{info['shards']} shards, {info['scales_in_other_shard']}/{info['scales']} scales in another shard "
              f"than their weight")  # fmt: skip
        print(f"{'method':<16} {'dtype':<9} {'seconds':>8} {'peak RSS MiB':>12} {'peak anon MiB':>13} "
              f"{'model MiB':>10} {'anon/disk':>9}")
        for method, dtype in (("from_pretrained", "bfloat16"), ("from_pretrained", "float32"),
                              ("eager", "bfloat16"), ("convert", "float32")):  # fmt: skip
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, str(path), dtype], capture_output=True, text=True
            )
            if out.returncode:
                print(out.stderr[-2000:])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{method:<16} {dtype:<9} {r['seconds']:>8.2f} {r['peak_above_import_mib']:>12.0f} "
                  f"{r['anon_above_import_mib']:>13.0f} {r['model_mib']:>10.0f} "
                  f"{r['anon_above_import_mib'] * 2**20 / info['disk_bytes']:>9.2f}")


if __name__ == "__main__":
    main()
