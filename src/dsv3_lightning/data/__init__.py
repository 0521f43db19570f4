"""The data half: sources, preparation into token shards, the store, the training order, the DataModule.

==================  ==========================================================================
``sources.py``      which files of a corpus are text, their documents, the per-document split
``prepare.py``      ``dsv3 prepare``: tokenized once by N workers into shards, resumable
``store.py``        the prepared directory: shards + ``index.json``, checked on open, windows
``sampling.py``     the global training order (computed permutations, mixtures), dealt to replicas
``module.py``       ``DSV3DataModule``: Lightning's hooks over the above
``command.py``      the ``dsv3 prepare`` command line
==================  ==========================================================================
"""

from dsv3_lightning.data.module import (
    DSV3DataModule,
    data_replicas,
    default_cache_dir,
    targets_in_batch,
    windows_in_batch,
)
from dsv3_lightning.data.prepare import PrepareSettings, prepare_corpus
from dsv3_lightning.data.store import TokenWindows, open_prepared

__all__ = [
    "DSV3DataModule",
    "PrepareSettings",
    "TokenWindows",
    "data_replicas",
    "default_cache_dir",
    "open_prepared",
    "prepare_corpus",
    "targets_in_batch",
    "windows_in_batch",
]
