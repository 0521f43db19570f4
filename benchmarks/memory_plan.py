"""Memory plans of the two large shapes, from the real code on the meta device (docs/memory_plan.md).

    python benchmarks/memory_plan.py            # both tables, about 10 s and under 1 GB of memory

- configs/671B.yaml at DeepSeek-V3's layout, PP16 x EP64 x DP2 = 2,048 ranks (SPEC.md §8: 16-way
  DualPipe, 64-way expert parallelism over 8 nodes, ZeRO-1 data parallelism);
- configs/16B.yaml (DeepSeek-V2-Lite's shape), which names no layout: PP2 x EP8 x DP4 = 64 ranks,
  each expert group one 8-GPU node (NVLink), as V3's EP64 fills 8 whole nodes, and its 27 layers
  over 4 DualPipeV stages.

Both with the configs' own micro-batch (``data.batch_size`` 1 x ``data.seq_len`` 4096) and the
schedule's fewest micro-batches (2 x PP for DualPipeV; its peak does not grow with more). Each table
is ``dsv3 plan``'s output; the wall time and the peak RSS of this process are printed last.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from dsv3_lightning.plugins.plan.build import build_plan_report
from dsv3_lightning.plugins.plan.command import parser

ROOT = Path(__file__).resolve().parents[1]
PLANS = (
    ("configs/671B.yaml", "16", "64", "2"),
    ("configs/16B.yaml", "2", "8", "4"),
)


def main() -> None:
    start = time.perf_counter()
    for config, pipeline, expert, data in PLANS:
        flags = ["--config", str(ROOT / config), "--pipeline", pipeline, "--expert", expert, "--data", data]
        print(build_plan_report(parser().parse_args(flags)).replace(str(ROOT) + "/", ""))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{time.perf_counter() - start:.1f} s for both plans; peak RSS {rss / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
