"""The data half: sources, preparation into token shards, the store, the training order, conversations
for fine-tuning, the DataModule.

==================== ==========================================================================
``sources.py``       which files of a corpus are text, their documents, the per-document split
``prepare.py``       ``dsv3 prepare``: tokenized once by N workers into shards, resumable
``store.py``         the prepared directory: shards + ``index.json``, checked on open, windows
``sampling.py``      the global training order (computed permutations, mixtures), dealt to replicas
``chat.py``          chat templates: rendering, the assistant's spans, built-ins, a tokenizer's own
``conversations.py`` fine-tuning data: conversations read, checked, tokenized, packed into windows
``docstring_qa.py``  the default conversations: the standard library's docstrings as Q/A pairs
``module.py``        ``DSV3DataModule``: Lightning's hooks over the above
``command.py``       the ``dsv3 prepare`` command line
==================== ==========================================================================
"""

from dsv3_lightning.data.chat import BUILTIN_TEMPLATES, ChatTemplate, load_chat_template, resolve_template
from dsv3_lightning.data.conversations import Conversations
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
    "BUILTIN_TEMPLATES",
    "ChatTemplate",
    "Conversations",
    "DSV3DataModule",
    "PrepareSettings",
    "TokenWindows",
    "data_replicas",
    "default_cache_dir",
    "load_chat_template",
    "open_prepared",
    "prepare_corpus",
    "resolve_template",
    "targets_in_batch",
    "windows_in_batch",
]
