"""What one rank may read of the run without asking the others.

Some of Lightning's conveniences are collectives in disguise: ``trainer.log_dir`` broadcasts rank 0's
directory to every rank ("you must call this on all processes"). Code that runs on global rank 0
only (writing a heat map, a marker file) must not touch them, or rank 0 waits in a broadcast while
the other ranks are in the next collective, and the run hangs until the process-group timeout. The
functions here give the same answers from local state; use them in any ``is_global_zero`` branch.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def log_dir(trainer: L.Trainer) -> Path:
    """``trainer.log_dir`` as this rank sees it, without its broadcast (rank 0's is the run's)."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        if directory is not None:
            return Path(directory)
    return Path(trainer.default_root_dir)


__all__ = ["log_dir"]
