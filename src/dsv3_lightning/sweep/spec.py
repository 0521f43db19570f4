"""The sweep file: a base config, named variants, seeds, and what the report shows.

    # configs/sweeps/load_balancing.yaml          (paths are relative to this file)
    base: ../tiny.yaml                            # one file or a list: `dsv3 fit --config` each, in order
    seeds: [1, 2]                                 # optional: every variant once per seed (--seed_everything)
    overrides:                                    # optional: `dsv3 fit` options for every run, after all configs
      trainer.max_steps: 400
    variants:
      none:
        description: no balancing at all         # optional, shown in the results table
        config: ../ablations/balancing/none.yaml  # optional, one file or a list, after the base
        overrides: {trainer.gradient_clip_val: 0.5}   # optional, win over the sweep's overrides
      bias: {config: ../ablations/balancing/bias.yaml}
    table:                                        # optional: the results table's metric columns
      - val/loss                                  #   the last logged value
      - {metric: train/max_vio, last_steps: 100}  #   the mean over the last 100 steps
    plots: [train/loss, train/max_vio]            # optional: one PNG of curves per metric
    smoothing: 0.8                                # optional: EMA coefficient of the plotted curves

Overrides are `dsv3 fit` command-line options written as a mapping: the key is the option without
``--`` (``trainer.max_steps``, ``model.config.n_group``), the value any YAML value (lists and
mappings, e.g. a ``trainer.plugins`` list, are passed as JSON, which jsonargparse reads as YAML).

Everything is checked here, before any run starts; each error names the file, the key, what was
seen and the fix. ``load_sweep`` turns the file into a ``Sweep``; ``Sweep.runs`` expands it into
``Run`` objects (variant × seed), which know their directory and their `dsv3 fit` arguments.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, kw_only=True)
class Metric:
    """A column of the results table: one logged metric summarised over a run."""

    metric: str
    """The metrics.csv column, e.g. ``val/loss``."""
    last_steps: int | None = None
    """None: the last logged value. N: the mean of the values logged in the run's last N steps."""

    @property
    def label(self) -> str:
        return self.metric if self.last_steps is None else f"{self.metric} (last {self.last_steps} steps)"


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One named way to run the base config."""

    name: str
    """Its name: the run directory and the table row."""
    configs: tuple[Path, ...] = ()
    """Override files applied after the base config (``--config`` each, in order)."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """`dsv3 fit` options applied after the sweep's own ``overrides``."""
    description: str = ""
    """Shown in the results table."""


@dataclass(frozen=True, kw_only=True)
class Run:
    """One `dsv3 fit` of a sweep: a variant with a seed, and where it logs."""

    variant: Variant
    seed: int | None
    """``--seed_everything``; None keeps the base config's seed."""
    directory: Path
    """The run's log directory: metrics.csv, config.yaml, checkpoints/, the finished marker."""
    fit_args: tuple[str, ...]
    """Everything after ``dsv3 fit``."""

    @property
    def label(self) -> str:
        return self.variant.name if self.seed is None else f"{self.variant.name}/seed{self.seed}"


@dataclass(frozen=True, kw_only=True)
class Sweep:
    path: Path
    """The sweep file."""
    base: tuple[Path, ...]
    """Configs every run starts from (``--config`` each, in order)."""
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] | None = None
    """Each variant runs once per seed; None: once, with the base config's seed."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    table: tuple[Metric, ...] = (Metric(metric="val/loss"), Metric(metric="train/loss"))
    plots: tuple[str, ...] = ("train/loss",)
    smoothing: float = 0.0
    """EMA coefficient applied to plotted curves (0: raw)."""

    @property
    def name(self) -> str:
        return self.path.stem

    def select(self, names: list[str]) -> Sweep:
        """The sweep restricted to the variants ``names`` (``--variants``), in the file's order."""
        known = [v.name for v in self.variants]
        for name in names:
            if name not in known:
                raise ValueError(f"--variants {name!r} is not a variant of {self.path}; its variants are {', '.join(known)}"
                                 f"{_did_you_mean(name, known)}")
        return replace(self, variants=tuple(v for v in self.variants if v.name in names))

    def runs(self, out: Path, extra_args: list[str]) -> list[Run]:
        """Every (variant, seed) as a ``Run`` logging under ``out``; ``extra_args`` go to every `dsv3 fit`.

        The sweep's own arguments come last, so that they win: a CSVLogger writing to the run's
        directory, the seed, no progress bar (the logs are files), and the ``FinishedMarker`` callback.
        """
        runs = []
        for variant in self.variants:
            for seed in self.seeds or (None,):
                if seed is None:
                    save_dir, name, version = out, "", variant.name
                else:
                    save_dir, name, version = out, variant.name, f"seed{seed}"
                directory = out / name / version if name else out / version
                args: list[str] = []
                for config in (*self.base, *variant.configs):
                    args += ["--config", _display_path(config)]
                args += [_option(k, v) for k, v in {**self.overrides, **variant.overrides}.items()]
                args += extra_args
                if seed is not None:
                    args.append(f"--seed_everything={seed}")
                logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                          "init_args": {"save_dir": _display_path(save_dir), "name": name, "version": version}}
                marker = {"class_path": "dsv3_lightning.sweep.marker.FinishedMarker"}
                args += [
                    _option("trainer.logger", logger),
                    _option("trainer.default_root_dir", _display_path(directory)),
                    "--trainer.enable_progress_bar=false",
                    _option("trainer.callbacks+", marker),
                ]
                runs.append(Run(variant=variant, seed=seed, directory=directory, fit_args=tuple(args)))
        return runs


def _option(key: str, value: Any) -> str:
    """``--key=value``, one argv element (so ``trainer.callbacks+`` becomes ``--trainer.callbacks+=...``)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"--{key}={text}"


def _display_path(path: Path) -> str:
    """Relative to the working directory when below it (shorter, portable commands), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------- loading
TOP_KEYS = ("base", "seeds", "overrides", "variants", "table", "plots", "smoothing")
VARIANT_KEYS = ("config", "overrides", "description")


def load_sweep(path: str | Path) -> Sweep:
    """Reads and checks a sweep file (see the module docstring for its keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist; the shipped sweeps are in configs/sweeps/")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{path} is not valid YAML{at}: {problem}; fix the file's syntax (indentation, "
                         "a missing ':' or an unclosed bracket)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a mapping with the keys base and variants, got {type(data).__name__}")
    _check_keys(path, "", data, TOP_KEYS)
    for key in ("base", "variants"):
        if key not in data:
            raise ValueError(f"{path} has no {key!r} key; a sweep file needs base (the config every run starts "
                             "from) and variants (name: overrides)")
    here = path.parent
    base = tuple(_config_paths(path, "base", data["base"], here))
    if not base:
        raise ValueError(f"{path}: base is empty; name the config every run starts from, e.g. base: ../tiny.yaml")
    variants = data["variants"]
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{path}: variants must be a non-empty mapping of name -> {{config, overrides, "
                         f"description}}, got {variants!r}")
    return Sweep(
        path=path,
        base=base,
        variants=tuple(_variant(path, name, spec, here) for name, spec in variants.items()),
        seeds=_seeds(path, data.get("seeds")),
        overrides=_overrides(path, "overrides", data.get("overrides")),
        table=tuple(_metric(path, i, m) for i, m in enumerate(data["table"])) if "table" in data else Sweep.table,
        plots=tuple(_str_list(path, "plots", data["plots"])) if "plots" in data else Sweep.plots,
        smoothing=_smoothing(path, data.get("smoothing", 0.0)),
    )


def _check_keys(path: Path, where: str, data: dict, allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            raise ValueError(
                f"{path}: unknown key {where}{key!r}{_did_you_mean(str(key), list(allowed))}; "
                f"the keys {'of a variant ' if where else ''}are {', '.join(allowed)}"
            )


def _config_paths(path: Path, key: str, value: Any, here: Path) -> list[Path]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: {key} must be a path or a list of paths, got {value!r}")
    resolved = []
    for name in names:
        config = (here / name).resolve()
        if not config.is_file():
            raise ValueError(
                f"{path}: {key}: config {name!r} does not exist (looked for {config}); paths in a sweep "
                f"file are relative to the sweep file's folder ({here})"
            )
        resolved.append(config)
    return resolved


def _variant(path: Path, name: Any, spec: Any, here: Path) -> Variant:
    key = f"variants.{name}"
    if isinstance(name, bool):
        raise ValueError(f"{path}: a variant is named {name} because YAML reads a bare on/off/yes/no as a "
                         "boolean; quote the name, e.g. \"off\":")
    name = str(name)
    if not NAME.match(name):
        raise ValueError(f"{path}: variant name {name!r} becomes a directory name: use letters, digits, '_', '-' "
                         "and '.' only")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: {key} must be a mapping with keys {', '.join(VARIANT_KEYS)} (or empty), "
                         f"got {spec!r}")
    _check_keys(path, f"{key}.", spec, VARIANT_KEYS)
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{path}: {key}.description must be text, got {description!r}")
    return Variant(
        name=name,
        configs=tuple(_config_paths(path, f"{key}.config", spec["config"], here)) if "config" in spec else (),
        overrides=_overrides(path, f"{key}.overrides", spec.get("overrides")),
        description=description,
    )


def _overrides(path: Path, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k and not k.startswith("-") for k in value):
        raise ValueError(f"{path}: {key} must map `dsv3 fit` options without '--' to values, e.g. "
                         f"{{trainer.max_steps: 100}}, got {value!r}")
    return dict(value)


def _seeds(path: Path, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise ValueError(f"{path}: seeds must be a non-empty list of integers, e.g. seeds: [1, 2], got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{path}: seeds {value} repeats a seed; list each once")
    return tuple(value)


def _metric(path: Path, index: int, value: Any) -> Metric:
    if isinstance(value, str):
        return Metric(metric=value)
    if isinstance(value, dict) and isinstance(value.get("metric"), str) and set(value) <= {"metric", "last_steps"}:
        last = value.get("last_steps")
        if last is None or (isinstance(last, int) and last > 0):
            return Metric(metric=value["metric"], last_steps=last)
    raise ValueError(f"{path}: table[{index}] must be a metric name or {{metric: NAME, last_steps: N > 0}}, "
                     f"got {value!r}")


def _str_list(path: Path, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: {key} must be a list of metric names, e.g. [train/loss], got {value!r}")
    return value


def _smoothing(path: Path, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{path}: smoothing ({value!r}) must be a number in [0, 1): the EMA coefficient of plotted "
                         "curves, 0 for none")
    return float(value)
