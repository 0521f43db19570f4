"""``dsv3 sweep SWEEP.yaml [options] [-- dsv3 fit options for every run]``.

    dsv3 sweep configs/sweeps/load_balancing.yaml                 # run all, then the table and plots
    dsv3 sweep configs/sweeps/load_balancing.yaml --jobs 2        # two runs at a time
    dsv3 sweep configs/sweeps/mtp.yaml --variants off d1 --seeds 1 -- --trainer.max_steps 100
    dsv3 sweep configs/sweeps/fp8.yaml --print_commands > jobs.txt   # one `dsv3 fit` line per run
    dsv3 sweep configs/sweeps/fp8.yaml --report_only              # tables and plots of what finished

Order of work: read and check the sweep file, check every run's arguments with the `dsv3 fit` parser
(so a typo fails in a second, not after hours), then run (or print) the unfinished runs, then write
``results.csv``, ``results.md`` and the plots into the output folder (``runs/sweeps/<sweep name>``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from dsv3_lightning.sweep.check import check_run
from dsv3_lightning.sweep.marker import is_finished
from dsv3_lightning.sweep.plots import MATPLOTLIB_MISSING, draw, matplotlib_available
from dsv3_lightning.sweep.results import collect, markdown_table, write_csv, write_markdown
from dsv3_lightning.sweep.runner import run_all
from dsv3_lightning.sweep.spec import Run, Sweep, load_sweep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3 sweep",
        description="Runs the named variants of a sweep file (configs/sweeps/*.yaml), each as its own "
        "`dsv3 fit`, skipping those already finished, then writes results.csv, results.md and PNG plots.",
        epilog="Arguments after `--` are passed to every `dsv3 fit`, e.g. -- --trainer.max_steps 100.",
    )
    parser.add_argument("sweep", type=Path, help="the sweep file, e.g. configs/sweeps/load_balancing.yaml")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: runs/sweeps/<sweep file name>)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="run only these variants (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="replace the sweep file's seeds")
    parser.add_argument("--heartbeat", type=float, default=60.0, metavar="SECONDS",
                        help="say what is running after this many seconds without another event (default 60)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print_commands", action="store_true",
                      help="print each unfinished run as a standalone `dsv3 fit` command (for a cluster "
                      "scheduler; paths are relative to the current folder) and run nothing")
    mode.add_argument("--report_only", action="store_true",
                      help="run nothing; write the tables and plots of the runs that finished")
    return parser


def main(argv: list[str]) -> None:
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.jobs < 1:
        raise ValueError(f"--jobs ({args.jobs}) must be at least 1")
    if not args.heartbeat > 0:
        raise ValueError(f"--heartbeat ({args.heartbeat}) must be a positive number of seconds")
    sweep = load_sweep(args.sweep)
    if args.variants:
        sweep = sweep.select(args.variants)
    if args.seeds:
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"--seeds {args.seeds} repeats a seed; list each once")
        sweep = replace(sweep, seeds=tuple(args.seeds))
    out = args.out or Path("runs") / "sweeps" / sweep.name
    runs = sweep.runs(out, extra)
    for run in runs:
        check_run(run, str(args.sweep))

    if args.print_commands:
        print_commands(runs)
        return
    failed: set[str] = set()
    if not args.report_only:
        print(f"sweep {sweep.name}: {len(runs)} runs ({len(sweep.variants)} variants"
              f"{f' x seeds {list(sweep.seeds)}' if sweep.seeds else ''}), {args.jobs} at a time, in {out}",
              flush=True)
        failed = run_all(runs, out, args.jobs, sweep.table, echo=lambda line: print(line, flush=True),
                         heartbeat=args.heartbeat)
    report(sweep, runs, out, failed, command=" ".join(["dsv3 sweep", *map(shlex.quote, argv)]))
    if failed:
        raise SystemExit(f"sweep {sweep.name}: {len(failed)} of {len(runs)} runs failed: {', '.join(sorted(failed))}; "
                         "their logs are in " + str(out / "logs"))


def print_commands(runs: list[Run]) -> None:
    """One line per unfinished run on stdout (nothing else there: it can be piped to a scheduler)."""
    finished = 0
    for run in runs:
        if is_finished(run):
            finished += 1
            continue
        print(shlex.join(["dsv3", "fit", *run.fit_args]))
    if finished:
        print(f"# {finished} finished run(s) not printed", file=sys.stderr)


def report(sweep: Sweep, runs: list[Run], out: Path, failed: set[str], command: str) -> None:
    """results.csv, results.md and the plots of the finished runs; the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    results = collect(sweep, runs, failed)
    write_csv(out / "results.csv", sweep, results)
    write_markdown(out / "results.md", sweep, results, command)
    print(f"\n{markdown_table(sweep, results)}\n\nwrote {out / 'results.csv'} and {out / 'results.md'}")
    if not any(r.status == "finished" for r in results):
        print("plots skipped: no run has finished")
    elif not matplotlib_available():
        print(MATPLOTLIB_MISSING)
    else:
        for path in draw(sweep, results, out):
            print(f"wrote {path}")
