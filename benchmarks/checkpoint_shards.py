"""Checkpoint bytes per rank against the rank's share, and save / resume time, on 4 gloo processes.

    .venv/bin/python benchmarks/checkpoint_shards.py [--config configs/small.yaml] [--layout ep4]

A real Lightning run per variant: the module built on meta (``building_on_meta``, as ``dsv3 fit``
builds it for these strategies), ``Trainer(devices=4, accelerator="cpu", precision="32-true")`` with
ExpertParallelStrategy(4) (``--layout ep4``) or DualPipeStrategy(2, 4, expert_parallel_size=2)
(``--layout pp2ep2``), start_method "fork", one training step (so that AdamW has its state), then
``trainer.save_checkpoint`` on every rank from ``on_train_end``; a second run resumes from it
(``fit(ckpt_path=...)``, one more step). Variants: ``checkpoint_format: sharded`` without and with
``zero1``, and ``checkpoint_format: full`` (no zero1: the strategy refuses that combination).

Per rank, measured:
- written: the bytes of its ``__<rank>_0.distcp`` file (sharded) or of the one file rank 0 writes
  (full); ``.metadata`` and ``objects.pt`` (rank 0) are in the total;
- share: the bytes of the tensors it holds, its parameters (expert shard, pipeline pieces) plus its
  optimizer state (under zero1 the state of its master shards; float32 master weights equal the
  parameters and are not saved); replicated parameters count on every rank that holds them, while
  DCP writes each replicated tensor once (on the rank with the fewest bytes so far), so written and
  share differ by design; the unique bytes are the whole model's parameters and AdamW state;
- save: wall seconds of ``trainer.save_checkpoint`` (barrier before, and Lightning's barrier after);
- load: wall seconds of the strategy's ``load_checkpoint`` + ``load_model_state_dict`` +
  ``load_optimizer_state_dict`` in the resumed run (the calls are timed by a subclass that only
  wraps them);
- RSS growth: peak resident memory during the save (and during the load) minus the resident memory
  just before it, sampled every 5 ms from ``/proc/self/status`` (VmRSS) by a thread of the rank.

Not measured: the page cache (files go to the machine's disk; no fsync cost is separated), GPU
memory, bf16 weights (float32 here), more than 4 processes, and any cost of the launch itself. The
4 processes share this machine's cores: the times are of a loaded CPU, not of a cluster's disks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dsv3_lightning.module import DSV3LightningModule, building_on_meta
from dsv3_lightning.plugins.dualpipe import DualPipeStrategy
from dsv3_lightning.plugins.expert_parallel import ExpertParallelStrategy
from dsv3_lightning.plugins.plan.command import RunSettings

MB = 1e6
WORLD = 4


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak VmRSS while inside, sampled every 5 ms; ``growth``: peak minus the RSS at entry."""

    def __enter__(self):
        self.before = self.peak = rss()
        self._done = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self):
        while not self._done:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self._done = True
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.before


def timed(base):
    """``base`` with its three load calls timed (and their RSS growth sampled), nothing else changed."""

    class Timed(base):
        load_seconds = 0.0
        load_growth = 0

        def _timed(self, call, *args, **kwargs):
            with PeakRSS() as m:
                out = call(*args, **kwargs)
            type(self).load_seconds += m.seconds
            type(self).load_growth = max(type(self).load_growth, m.growth)
            return out

        def load_checkpoint(self, *args, **kwargs):
            return self._timed(super().load_checkpoint, *args, **kwargs)

        def load_model_state_dict(self, *args, **kwargs):
            return self._timed(super().load_model_state_dict, *args, **kwargs)

        def load_optimizer_state_dict(self, *args, **kwargs):
            return self._timed(super().load_optimizer_state_dict, *args, **kwargs)

    Timed.__name__ = base.__name__
    return Timed


def make_strategy(layout: str, **kwargs):
    common = dict(start_method="fork", timeout=600, **kwargs)
    if layout == "ep4":
        return timed(ExpertParallelStrategy)(4, **common)
    if layout == "pp2ep2":
        return timed(DualPipeStrategy)(2, 4, expert_parallel_size=2, **common)
    raise ValueError(f"--layout {layout!r}: ep4 or pp2ep2")


def share_bytes(module: torch.nn.Module, optimizers) -> tuple[int, int]:
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    state = sum(
        v.numel() * v.element_size()
        for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )
    return params, state


class SaveAtEnd(L.Callback):
    """After the last step: every rank's share, then ``trainer.save_checkpoint(path)``, timed."""

    def __init__(self, path: Path, out: Path) -> None:
        self.path, self.out = path, out

    def on_train_end(self, trainer, pl_module) -> None:
        params, state = share_bytes(pl_module, trainer.optimizers)
        dist.barrier()
        with PeakRSS() as m:
            trainer.save_checkpoint(self.path)
        record = dict(params=params, state=state, save_s=m.seconds, save_growth=m.growth, rss=m.before)
        (self.out / f"save-{trainer.global_rank}.json").write_text(json.dumps(record))


class LoadTimes(L.Callback):
    """In the resumed run, before its step: what the timed strategy recorded for this rank."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        strategy = type(trainer.strategy)
        record = dict(load_s=strategy.load_seconds, load_growth=strategy.load_growth)
        (self.out / f"load-{trainer.global_rank}.json").write_text(json.dumps(record))


def fit(run: RunSettings, layout: str, root: Path, callbacks, *, max_steps: int, ckpt_path=None, **strategy):
    with building_on_meta():
        module = DSV3LightningModule(run.model_config(), [], **run.module_kwargs())
    seq_len, batch = run.data["seq_len"], run.data["batch_size"]
    vocab = run.model_config().vocab_size
    windows = torch.randint(0, vocab, (8 * batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=make_strategy(layout, **strategy), precision="32-true",
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
        default_root_dir=root, callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(list(windows), batch_size=batch), ckpt_path=ckpt_path, weights_only=False)


def measure(run: RunSettings, layout: str, root: Path, name: str, **strategy) -> dict:
    out = root / name
    out.mkdir()
    path = out / "checkpoint.ckpt"
    start = time.perf_counter()
    fit(run, layout, out, [SaveAtEnd(path, out)], max_steps=1, **strategy)
    first = time.perf_counter() - start
    start = time.perf_counter()
    fit(run, layout, out, [LoadTimes(out)], max_steps=2, ckpt_path=str(path), **strategy)
    second = time.perf_counter() - start
    ranks = []
    for rank in range(WORLD):
        record = json.loads((out / f"save-{rank}.json").read_text())
        record.update(json.loads((out / f"load-{rank}.json").read_text()))
        shard = path / f"__{rank}_0.distcp"
        single = path.stat().st_size if rank == 0 else 0
        record["written"] = shard.stat().st_size if path.is_dir() else single
        ranks.append(record)
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    total = sum(f.stat().st_size for f in files)
    files = sorted(f.name for f in path.iterdir()) if path.is_dir() else [path.name]
    shutil.rmtree(out)
    return dict(name=name, ranks=ranks, total=total, files=files, fit_s=(first, second))


def report(results: list[dict], args, whole: int) -> str:
    rows = [
        f"## {args.config} shape on {args.layout} (4 gloo processes, fork), float32, AdamW",
        "",
        f"- whole model {whole:,} parameters: {4 * whole / MB:.1f} MB of weights, "
        f"{8 * whole / MB:.1f} MB of AdamW moments; unique bytes {12 * whole / MB:.1f} MB",
        "",
        "| variant | rank | params MB | optim. MB | written MB | save s "
        "| save +RSS MB | load s | load +RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for rank, x in enumerate(r["ranks"]):
            rows.append(
                f"| {r['name']} | {rank} | {x['params'] / MB:.1f} | {x['state'] / MB:.1f} "
                f"| {x['written'] / MB:.1f} | {x['save_s']:.2f} | {x['save_growth'] / MB:.0f} "
                f"| {x['load_s']:.2f} | {x['load_growth'] / MB:.0f} |"
            )
        share = sum(x["params"] + x["state"] for x in r["ranks"])
        rows.append(
            f"| {r['name']} | all | {sum(x['params'] for x in r['ranks']) / MB:.1f} "
            f"| {sum(x['state'] for x in r['ranks']) / MB:.1f} | **{r['total'] / MB:.1f}** (files) "
            f"| {max(x['save_s'] for x in r['ranks']):.2f} | | {max(x['load_s'] for x in r['ranks']):.2f} | |"
        )
        r["share"] = share
    rows += ["", "| variant | files | total written MB | sum of shares MB | fit+save s, resume fit s |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        files = ", ".join(r["files"]) if len(r["files"]) <= 6 else f"{len(r['files'])} files"
        rows.append(f"| {r['name']} | {files} | {r['total'] / MB:.1f} | {r['share'] / MB:.1f} "
                    f"| {r['fit_s'][0]:.0f}, {r['fit_s'][1]:.0f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--layout", default="ep4", choices=("ep4", "pp2ep2"))
    p.add_argument("--seq_len", type=int, default=32, help="tokens per window (the step's cost only)")
    p.add_argument("--batch", type=int, default=8, help="windows per step (global batch)")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary directory)")
    args = p.parse_args()
    run = RunSettings.load([args.config])
    run.data = {**run.data, "seq_len": args.seq_len, "batch_size": args.batch // WORLD}
    if args.layout == "pp2ep2":  # 2 replicas, each a pipeline of 2 reading the same slice: 4 micro-batches
        run.data["batch_size"] = args.batch // 2
    with torch.device("meta"):
        whole = sum(p.numel() for p in DSV3LightningModule(run.model_config(), []).parameters())
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        results = [
            measure(run, args.layout, root, "sharded", checkpoint_format="sharded"),
            measure(run, args.layout, root, "sharded + zero1", checkpoint_format="sharded", zero1=True),
            measure(run, args.layout, root, "full", checkpoint_format="full"),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(report(results, args, whole))
    print(f"\n`.venv/bin/python {' '.join(sys.argv)}` ({datetime.date.today()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__})")


if __name__ == "__main__":
    main()
