"""``dsv3 sweep``: run named variants of a config, collect their metrics, tabulate and plot them.

A sweep file (``configs/sweeps/*.yaml``, keys in ``spec.py``) names a base config and variants, each
a list of override files and `dsv3 fit` options, optionally crossed with seeds. The package is split
by concept:

- ``spec.py``: the sweep file, checked with errors that name the key and the fix; runs and their args;
- ``check.py``: every run's arguments parsed by the real `dsv3 fit` parser before anything runs;
- ``runner.py``: each run its own `dsv3 fit` process, ``--jobs`` at a time, a line per event;
- ``marker.py``: the callback with which a run marks itself finished (so a second call skips it,
  also for runs launched from ``--print_commands`` on a cluster);
- ``results.py``: metrics.csv of every run into results.csv (per run) and results.md (per variant);
- ``plots.py``: one PNG of curves per metric (matplotlib, optional);
- ``command.py``: the command line, ``main(argv)``.

Runs log with Lightning's CSVLogger into ``<out>/<variant>/seed<N>/`` (``<out>/<variant>/`` without
seeds), ``<out>`` being ``runs/sweeps/<sweep name>`` unless ``--out`` says otherwise.
"""

from dsv3_lightning.sweep.command import main

__all__ = ["main"]
