"""Data at scale, measured: preparation throughput by workers, sampler memory, fit start on a prepared corpus.

    python benchmarks/data_at_scale.py                    # 200 MB corpus, 1 and 2 workers (~10 min here)
    python benchmarks/data_at_scale.py --corpus_mb 50 --workers 1 2 4

1. **Corpus.** At least ``--corpus_mb`` of ``*.py``, ``*.pyi``, ``*.md`` and ``*.txt`` files copied from
   this Python's standard library and site-packages (whole files, in an order fixed by a hash of their
   paths) into ``--work_dir``; kept between runs.
2. **Tokenizer.** A 4,096-token byte-level BPE trained on a 20 MB sample, saved once, so that each
   preparation below measures tokenizing and sharding only.
3. **Preparation.** ``dsv3 prepare CORPUS --output DIR --tokenizer tok.json --workers N`` as its own
   process, with ``RAYON_NUM_THREADS=1`` so that each worker tokenizes on one core and N workers on N.
   Tokens/s is all tokens over the whole command's wall time (listing, tokenizing, sharding).
4. **Sampler memory.** tracemalloc's peak while making ``GlobalOrderSampler`` and drawing 100 batches of
   16 at 10^6 and 10^9 windows, against torch's ``DistributedSampler`` (which lists a permutation) at
   10^6 and 10^7 windows (10^9 would need about 48 GB).
5. **Fit start.** ``dsv3 fit --config configs/tiny.yaml --data.data_path DIR --trainer.max_steps 1``
   on the prepared corpus: the whole process's wall time to the end of its first step (start-up,
   imports, model, data setup, one step of 8 x 256 tokens); nothing is tokenized.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DSV3 = str(Path(sys.executable).parent / "dsv3")
SUFFIXES = (".py", ".pyi", ".md", ".txt")


def build_corpus(out: Path, megabytes: int) -> tuple[int, int]:
    marker = out / ".complete"
    if marker.is_file():
        files = [p for p in out.rglob("*") if p.is_file() and p.suffix in SUFFIXES]
        return len(files), sum(p.stat().st_size for p in files)
    shutil.rmtree(out, ignore_errors=True)
    roots = [Path(sysconfig.get_paths()["stdlib"]), *map(Path, site.getsitepackages())]
    found: dict[str, Path] = {}
    for i, root in enumerate(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
            for name in filenames:
                if name.endswith(SUFFIXES) and not name.startswith("."):
                    path = Path(dirpath, name)
                    found[f"{i}/{path.relative_to(root)}"] = path
    budget, count, total = megabytes * 1_000_000, 0, 0
    for rel in sorted(found, key=lambda r: hashlib.sha1(r.encode()).digest()):
        size = found[rel].stat().st_size
        if size == 0 or size > 4_000_000:
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found[rel], target)
        count, total = count + 1, total + size
        if total >= budget:
            break
    marker.write_text("")
    return count, total


def train_sample_tokenizer(corpus: Path, out: Path) -> float:
    from dsv3_lightning.data.prepare import tokenizer_sample
    from dsv3_lightning.data.sources import iter_documents, list_sources
    from dsv3_lightning.tokenizer import train_tokenizer

    if out.is_file():
        return 0.0
    start = time.perf_counter()
    sample = tokenizer_sample(list_sources(str(corpus), None), 20_000_000)
    train_tokenizer(iter_documents(sample), vocab_size=4096).save(str(out))
    return time.perf_counter() - start


def prepare(corpus: Path, output: Path, tokenizer: Path, workers: int) -> tuple[float, int, int]:
    shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    command = [DSV3, "prepare", str(corpus), "--output", str(output), "--tokenizer", str(tokenizer),
               "--workers", str(workers)]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    seconds = time.perf_counter() - start
    import json

    index = json.loads((output / "index.json").read_text())
    tokens = sum(index["splits"][s]["tokens"] for s in ("train", "val"))
    shards = sum(len(index["splits"][s]["shards"]) for s in ("train", "val"))
    return seconds, tokens, shards


def sampler_peaks() -> list[tuple[str, int, int]]:
    from torch.utils.data import DistributedSampler

    from dsv3_lightning.data.sampling import CorpusOrder, GlobalOrderSampler

    class Sized:
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

    rows = []
    warm = GlobalOrderSampler(CorpusOrder(10**6, 2), num_windows=10**6, num_replicas=8, rank=3, batch_size=16)
    next(iter(warm))  # numpy's and the seed sequence's one-time allocations, outside the measurements
    for name, n in [("GlobalOrderSampler", 10**6), ("GlobalOrderSampler", 10**9),
                    ("torch DistributedSampler", 10**6), ("torch DistributedSampler", 10**7)]:  # fmt: skip
        tracemalloc.start()
        if name == "GlobalOrderSampler":
            sampler = GlobalOrderSampler(CorpusOrder(n, 1), num_windows=n, num_replicas=8, rank=3, batch_size=16)
        else:
            sampler = DistributedSampler(Sized(n), num_replicas=8, rank=3, shuffle=True, seed=1, drop_last=True)
        it = iter(sampler)
        for _ in range(1600):
            next(it)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del it, sampler
        rows.append((name, n, peak))
    return rows


def fit_start(prepared: Path, work: Path) -> float:
    run = work / "fit"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    command = [DSV3, "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.data_path", str(prepared),
               "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
               "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=run, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus_mb", type=int, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--work_dir", type=Path, default=Path("/tmp/dsv3_data_bench"))
    args = p.parse_args()
    work = args.work_dir
    files, size = build_corpus(work / "corpus", args.corpus_mb)
    print(f"corpus: {files} files, {size / 1e6:.1f} MB ({work / 'corpus'})")
    seconds = train_sample_tokenizer(work / "corpus", work / "tokenizer.json")
    if seconds:
        print(f"tokenizer: 4,096-token BPE trained on a 20 MB sample in {seconds:.1f} s")

    print("\n| workers | wall (s) | tokens | tokens/s | MB/s | shards |\n|---|---|---|---|---|---|")
    for workers in args.workers:
        seconds, tokens, shards = prepare(work / "corpus", work / f"prepared_{workers}", work / "tokenizer.json", workers)
        print(f"| {workers} | {seconds:.1f} | {tokens / 1e6:.1f}M | {tokens / seconds:,.0f} | "
              f"{size / 1e6 / seconds:.2f} | {shards} |")  # fmt: skip

    print("\n| sampler | windows | peak Python memory |\n|---|---|---|")
    for name, n, peak in sampler_peaks():
        print(f"| {name} | 10^{len(str(n)) - 1} | {peak / 1024:,.1f} KiB |")

    seconds = fit_start(work / f"prepared_{args.workers[-1]}", work)
    print(f"\ndsv3 fit on the prepared {size / 1e6:.0f} MB corpus, process start to the end of step 1: {seconds:.1f} s")


if __name__ == "__main__":
    main()
