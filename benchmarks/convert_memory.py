"""Peak memory of ``dsv3 convert`` against the checkpoint's size, both directions.

    python benchmarks/convert_memory.py [--config small] [--max_shard_size 100000000]

Writes a Lightning checkpoint of a randomly initialised ``--config`` model (with one MTP module),
then converts it to a sharded Hugging Face directory and back, each conversion in a fresh process
that samples its own ``/proc/self/status`` every 5 ms. Prints the checkpoint size and each
conversion's peak anonymous memory (what a conversion allocates) and peak file-backed resident
memory (pages of memory-mapped checkpoint files; the kernel can drop them under pressure), beside
the same process's baseline after importing torch and dsv3_lightning.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}
import torch, dsv3_lightning.convert, dsv3_lightning.module, dsv3_lightning.plugins.mtp
baseline, peak, done = status(), status(), False
def sample():
    while not done:
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)
thread = threading.Thread(target=sample); thread.start()
mode, args = sys.argv[1], sys.argv[2:]
if mode == "make":
    from dsv3_lightning import preset
    from dsv3_lightning.plugins.mtp import MultiTokenPrediction
    module = dsv3_lightning.module.DSV3LightningModule(preset(args[0]), [MultiTokenPrediction(1)])
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, args[1])
else:
    dsv3_lightning.convert.convert(*args[:2], max_shard_size=int(args[2]))
done = True; thread.join()
print(json.dumps({"baseline": baseline, "peak": peak}))
"""


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small")
    parser.add_argument("--max_shard_size", type=int, default=100_000_000)
    args = parser.parse_args()
    mb = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, hf, back = Path(tmp) / "model.ckpt", Path(tmp) / "hf", Path(tmp) / "back.ckpt"
        child("make", args.config, str(ckpt))
        results = {
            ".ckpt -> Hugging Face": (ckpt, child("convert", str(ckpt), str(hf), str(args.max_shard_size))),
            "Hugging Face -> .ckpt": (hf, child("convert", str(hf), str(back), str(args.max_shard_size))),
        }
        shards = len(list(hf.glob("*.safetensors")))
        print(f"\n{args.config} config + 1 MTP module, float32; Hugging Face side in {shards} shards\n")
        print("| conversion | source size | peak anonymous memory (above baseline) | peak file-backed resident |")
        print("|---|---|---|---|")
        for name, (source, r) in results.items():
            anon = r["peak"]["RssAnon"] - r["baseline"]["RssAnon"]
            print(f"| {name} | {size(source) / mb:.0f} MiB | {anon / mb:.0f} MiB ({anon / size(source):.2f}x) | "
                  f"{r['peak']['RssFile'] / mb:.0f} MiB |")


if __name__ == "__main__":
    main()
