"""Every run's `dsv3 fit` arguments checked before the first run starts.

A typo in a variant's overrides would otherwise surface minutes or hours into a sweep, when that
variant's turn comes. ``check_run`` parses a run's arguments with the real `dsv3` parser (DSV3CLI,
so the same links and checks as ``dsv3 fit``), without building the model or the trainer, and builds
its ``ModelConfig`` (the shape checks of ``__post_init__``); this takes about 0.1 s per run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from dsv3_lightning.cli import DSV3CLI
from dsv3_lightning.config import ModelConfig
from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.sweep.spec import Run


class _ParseOnly(DSV3CLI):
    """Parses and runs ``before_instantiate_classes`` (the seq_len check), then stops."""

    def instantiate_classes(self) -> None:
        pass


def check_run(run: Run, sweep_path: str) -> None:
    """Raises ValueError naming the variant and `dsv3 fit`'s own complaint if its arguments are wrong."""
    stderr = io.StringIO()
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to N", once per run
    level = seed_logger.level
    seed_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # The sweep's own argv (dsv3 sweep ...) is not this parse's: LightningCLI would warn of both.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = _ParseOnly(
                DSV3LightningModule, DSV3DataModule, args=list(run.fit_args), run=False,
                parser_kwargs={"default_env": False},
            )
        ModelConfig(**cli.config.model.config.as_dict())
    except SystemExit:
        complaint = stderr.getvalue().strip().splitlines()
        reason = complaint[-1] if complaint else "the arguments do not parse"
        raise ValueError(
            f"{sweep_path}: variant {run.variant.name!r} is not a valid `dsv3 fit` configuration: {reason}. "
            f"Fix the variant's config/overrides (or the sweep's overrides) and check it alone with "
            f"`dsv3 fit {_preview(run)} --print_config`"
        ) from None
    except ValueError as error:
        raise ValueError(f"{sweep_path}: variant {run.variant.name!r}: {error}") from None
    finally:
        seed_logger.setLevel(level)


def _preview(run: Run) -> str:
    """The run's ``--config`` files, enough to reproduce a parse error by hand."""
    configs = [a for i, a in enumerate(run.fit_args) if i and run.fit_args[i - 1] == "--config"]
    return " ".join(f"--config {c}" for c in configs)
