"""Preparation: a corpus tokenized once, by N worker processes, into a token store (``dsv3 prepare``).

The work, in order, each step resumable:

1. **Settings.** ``prepare.json`` records what is being prepared (the source files with sizes and
   mtimes, the split, the tokenizer, the shard size). An output directory that holds another
   preparation is refused instead of mixed; a finished one (``index.json``) is reused as is.
2. **Tokenizer.** The one given (``tokenizer.json``, or a Hugging Face checkpoint directory holding
   one), else a byte-level BPE trained on a bounded sample: whole files in an order fixed by a hash of
   their paths until ``tokenizer_sample_bytes`` (the whole corpus when it is smaller, in path order).
   Saved as ``tokenizer.json`` before any tokenizing, so a resumed preparation uses the same one.
3. **Units.** Consecutive files (in path order) are grouped into work units of about ``unit_bytes``.
   A worker tokenizes a unit's documents, appends ``<|eos|>`` to each, splits them by document
   (:func:`~dsv3_lightning.data.sources.document_key`) and writes ``parts/NNNNNN.{train,val}.bin`` under
   temporary names, renames them, and writes the unit's ``.json`` last: a unit is done exactly when
   its ``.json`` exists. A killed preparation redoes only the units without one, so no document is
   lost or written twice. Progress (files, tokens, tokens/s) is logged every few seconds.
   Each unit also records its training document of lowest key and validation document of highest
   key (offset and length in its part), so that a split left empty can borrow the one document
   nearest the threshold without a second pass.
4. **Shards.** The parts are concatenated in unit order into fixed-size shards
   (:class:`~dsv3_lightning.data.store.ShardWriter`); ``index.json`` is written last, atomically, and
   the parts removed. The result is the same bytes for any number of workers.

A lock file serialises preparations of one directory (nodes preparing the same cache entry wait for
the first). Workers are forked processes (spawned where fork is unavailable); each tokenizes on one
thread when forked after the parent used the tokenizer's thread pool, so throughput scales with N.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from dsv3_lightning.data.sources import (
    SourceFile,
    describe_data_path,
    is_single_document,
    iter_documents,
    list_sources,
    split_file,
)
from dsv3_lightning.data.store import (
    FORMAT,
    INDEX_FILE,
    SPLITS,
    TOKENIZER_FILE,
    ShardWriter,
    token_dtype,
    write_json_atomic,
)
from dsv3_lightning.tokenizer import eos_token_id, tokenizer_fingerprint, tokenizer_from_str, train_tokenizer

logger = logging.getLogger(__name__)

_SETTINGS_FILE = "prepare.json"
_PARTS = "parts"
_ENCODE_BATCH_CHARS = 1_000_000  # characters per encode call: bounds the encodings held at once
_LOG_EVERY_S = 5.0


@dataclass(frozen=True, kw_only=True)
class PrepareSettings:
    """What a preparation makes; the data module builds one from its ``data.*`` keys."""

    data_path: str | None = None
    """A corpus (file or directory), or null for the Python standard library."""
    max_corpus_bytes: int | None = None
    """Keep whole files up to this many bytes (chosen by a hash of their paths); null keeps all."""
    val_fraction: float = 0.05
    """Expected fraction of documents held out for validation."""
    seed: int = 1234
    """Seed of the document split."""
    vocab_size: int = 4096
    """Vocabulary of the BPE tokenizer trained when none is given."""
    tokenizer_sample_bytes: int = 100_000_000
    """Bytes of whole files the tokenizer is trained on (a bounded sample of a large corpus)."""
    shard_tokens: int = 1 << 26
    """Token ids per shard (the last one holds the rest): 128 MB of uint16."""
    unit_bytes: int = 1_000_000
    """Bytes of source files per work unit (one file when larger)."""

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(
                f"data.val_fraction ({self.val_fraction}) must be in (0, 1): it is the fraction of documents "
                "held out for validation. 0.05 is typical."
            )
        for key in ("shard_tokens", "unit_bytes", "tokenizer_sample_bytes", "vocab_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"prepare {key} ({getattr(self, key)}) must be positive")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def signature(settings: PrepareSettings, sources: list[SourceFile], tokenizer: Tokenizer | None) -> dict:
    """What makes two preparations the same: the files, the split, the shard size and the tokenizer."""
    return {
        "format": FORMAT,
        "files": [(f.name, f.size, f.mtime_ns) for f in sources],
        "val_fraction": settings.val_fraction,
        "seed": settings.seed,
        "shard_tokens": settings.shard_tokens,
        "tokenizer": (
            {"given": tokenizer_fingerprint(tokenizer)}
            if tokenizer is not None
            else {"trained": settings.vocab_size, "sample_bytes": settings.tokenizer_sample_bytes}
        ),
    }


def signature_key(sig: dict) -> str:
    return _digest(sig)


def tokenizer_sample(sources: list[SourceFile], budget: int) -> list[SourceFile]:
    """Whole files for training the tokenizer: all of them in path order when within ``budget``, else
    files in an order fixed by a hash of their names until the budget is spent (at least one)."""
    if sum(f.size for f in sources) <= budget:
        return sources
    chosen, spent = [], 0
    for f in sorted(sources, key=lambda f: hashlib.sha1(f.name.encode("utf-8")).digest()):
        if spent + f.size <= budget or not chosen:
            chosen.append(f)
            spent += f.size
    return sorted(chosen, key=lambda f: f.path)


def make_units(sources: list[SourceFile], unit_bytes: int) -> list[list[SourceFile]]:
    units: list[list[SourceFile]] = [[]]
    size = 0
    for f in sources:
        if units[-1] and size + f.size > unit_bytes:
            units.append([])
            size = 0
        units[-1].append(f)
        size += f.size
    return [u for u in units if u]


@lru_cache(maxsize=1)
def _worker_tokenizer(tokenizer_json: str) -> Tokenizer:
    return tokenizer_from_str(tokenizer_json, source="the preparation's tokenizer")


def tokenize_unit(task: tuple[int, list[SourceFile], str, str, dict]) -> tuple[int, dict]:
    """Tokenize one unit into ``parts/`` (the worker's whole job); returns its counts."""
    unit_id, files, tokenizer_json, parts_dir, split = task
    tokenizer = _worker_tokenizer(tokenizer_json)
    eos = eos_token_id(tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    parts = Path(parts_dir)
    stem = f"{unit_id:06d}"
    counts: dict[str, Any] = {"train_tokens": 0, "val_tokens": 0, "train_documents": 0, "val_documents": 0}
    counts.update(files=len(files), bytes=sum(f.size for f in files))
    # The document each split would lend: (key, offset in the part, tokens); lowest train, highest val key.
    lend: dict[str, list | None] = {"train": None, "val": None}
    outs = {False: open(parts / f".{stem}.train.bin.tmp", "wb"), True: open(parts / f".{stem}.val.bin.tmp", "wb")}
    # encode_batch_fast: the same ids without offsets (lighter and faster; tokenizers >= 0.20)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    try:
        documents = itertools.chain.from_iterable(split_file(f, **split) for f in files)
        while batch := list(_take_chars(documents, _ENCODE_BATCH_CHARS)):
            encodings = encode([text for text, _, _ in batch], add_special_tokens=False)
            for is_val, name in ((False, "train"), (True, "val")):
                ids = []
                for enc, (_, v, key) in zip(encodings, batch, strict=True):
                    if v is not is_val:
                        continue
                    best = lend[name]
                    if best is None or (key > best[0] if is_val else key < best[0]):
                        offset = counts[f"{name}_tokens"] + sum(len(i) for i in ids)
                        lend[name] = [key, offset, len(enc.ids) + 1]
                    ids.append(enc.ids + [eos])
                stream = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype)
                stream.tofile(outs[is_val])
                counts[f"{name}_tokens"] += len(stream)
                counts[f"{name}_documents"] += len(ids)
    finally:
        for f in outs.values():
            f.close()
    counts["lend"] = lend
    for name in SPLITS:
        os.replace(parts / f".{stem}.{name}.bin.tmp", parts / f"{stem}.{name}.bin")
    write_json_atomic(parts / f"{stem}.json", counts)
    return unit_id, counts


def _take_chars(documents, budget: int):
    """Documents from the iterator until ``budget`` characters (at least one)."""
    chars = 0
    for doc in documents:
        yield doc
        chars += len(doc[0])
        if chars >= budget:
            return


@contextlib.contextmanager
def _locked(output: Path):
    output.mkdir(parents=True, exist_ok=True)
    with open(output / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Progress:
    """Plain log lines every few seconds: files, tokens, tokens/s (readable without a terminal)."""

    def __init__(self, total_files: int, done_files: int) -> None:
        self.total_files, self.files, self.tokens = total_files, done_files, 0
        self.start = self.last = time.perf_counter()

    def add(self, counts: dict, *, final: bool = False) -> None:
        self.files += counts.get("files", 0)
        self.tokens += counts.get("train_tokens", 0) + counts.get("val_tokens", 0)
        now = time.perf_counter()
        if final or now - self.last >= _LOG_EVERY_S:
            self.last = now
            logger.info(
                "prepare: %d/%d files, %.2fM tokens this run, %.0f tokens/s",
                self.files, self.total_files, self.tokens / 1e6, self.tokens / max(now - self.start, 1e-9),
            )  # fmt: skip

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def _resolve_tokenizer(
    settings: PrepareSettings, sources: list[SourceFile], output: Path, given: Tokenizer | None
) -> Tokenizer:
    path = output / TOKENIZER_FILE
    if path.is_file():  # a resumed preparation keeps the tokenizer it began with
        return tokenizer_from_str(path.read_text(encoding="utf-8"), source=str(path))
    if given is None:
        sample = tokenizer_sample(sources, settings.tokenizer_sample_bytes)
        logger.info(
            "training a %d-token byte-level BPE tokenizer on %d of %d files (%.1f MB)",
            settings.vocab_size, len(sample), len(sources), sum(f.size for f in sample) / 1e6,
        )  # fmt: skip
        start = time.perf_counter()
        given = train_tokenizer(iter_documents(sample), vocab_size=settings.vocab_size)
        logger.info("trained the tokenizer in %.1f s", time.perf_counter() - start)
    tmp = output / f".{TOKENIZER_FILE}.tmp"
    given.save(str(tmp))
    os.replace(tmp, path)
    return given


def _run_units(pending: list[tuple], workers: int, progress: _Progress) -> None:
    if workers == 1 or len(pending) == 1:
        for task in pending:
            progress.add(tokenize_unit(task)[1])
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(workers, len(pending))) as pool:
        for _, counts in pool.imap_unordered(tokenize_unit, pending):
            progress.add(counts)


def _assemble(output: Path, sig: dict, tokenizer: Tokenizer, num_units: int, stats: dict) -> dict:
    """Concatenate the parts, in unit order, into shards; write the index last."""
    parts = output / _PARTS
    totals = dict.fromkeys(["train_tokens", "val_tokens", "train_documents", "val_documents", "bytes"], 0)
    lenders: dict[str, list] = {"train": [], "val": []}
    for unit in range(num_units):
        counts = json.loads((parts / f"{unit:06d}.json").read_text())
        for key in totals:
            totals[key] += counts[key]
        for split, entry in counts["lend"].items():
            if entry is not None:
                lenders[split].append((entry[0], unit, entry))
    documents = totals["train_documents"] + totals["val_documents"]
    where = stats["data"]
    if totals["train_tokens"] + totals["val_tokens"] == documents:
        raise ValueError(f"{where} holds no text: every document is empty. Point it at a corpus with text in it.")
    if documents < 2:
        raise ValueError(
            f"{where} holds a single document in a file that is not plain text: there is nothing to hold out "
            "for validation. Add documents."
        )
    # (unit, lending split, [key, offset, length]) when a split is empty: the nearest document moves.
    borrow = None
    if totals["val_documents"] == 0:
        _, unit, entry = min(lenders["train"])
        borrow = (unit, "train", entry)
    elif totals["train_documents"] == 0:
        _, unit, entry = max(lenders["val"])
        borrow = (unit, "val", entry)
    if borrow is not None:
        lender, borrower = borrow[1], "val" if borrow[1] == "train" else "train"
        for split, sign in ((lender, -1), (borrower, 1)):
            totals[f"{split}_documents"] += sign
            totals[f"{split}_tokens"] += sign * borrow[2][2]
        logger.info("prepare: the %s split was empty; it takes the one document nearest the threshold", borrower)
    dtype = token_dtype(tokenizer.get_vocab_size())
    index: dict[str, Any] = {"format": FORMAT, "dtype": dtype.name, "shard_tokens": sig["shard_tokens"]}
    index["tokenizer"] = {
        "file": TOKENIZER_FILE,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": tokenizer.get_vocab_size(),
        "eos_token_id": eos_token_id(tokenizer),
    }
    index["splits"] = {}
    for split in SPLITS:
        shutil.rmtree(output / split, ignore_errors=True)  # a killed assembly's shards
        writer = ShardWriter(output, split, shard_tokens=sig["shard_tokens"], dtype=dtype)
        for unit in range(num_units):
            tokens = np.fromfile(parts / f"{unit:06d}.{split}.bin", dtype=dtype)
            if borrow is not None and unit == borrow[0]:
                _, offset, length = borrow[2]
                if split == borrow[1]:  # the lender: without the document
                    tokens = np.concatenate([tokens[:offset], tokens[offset + length :]])
                else:  # the borrower: the document, first
                    lent = np.fromfile(parts / f"{unit:06d}.{borrow[1]}.bin", dtype=dtype)
                    writer.write(lent[offset : offset + length])
            writer.write(tokens)
        index["splits"][split] = {
            "tokens": totals[f"{split}_tokens"],
            "documents": totals[f"{split}_documents"],
            "shards": writer.close(),
        }
    index["source"] = {"data_path": where, "files": len(sig["files"]), "bytes": totals["bytes"]}
    index["settings"] = sig
    write_json_atomic(output / INDEX_FILE, index)
    shutil.rmtree(parts, ignore_errors=True)
    (output / _SETTINGS_FILE).unlink(missing_ok=True)
    return index


def prepare_corpus(
    settings: PrepareSettings,
    output: str | Path,
    *,
    workers: int = 1,
    tokenizer: Tokenizer | None = None,
    sources: list[SourceFile] | None = None,
) -> dict:
    """Prepare ``settings.data_path`` into ``output`` (see the module docstring); returns the index.

    ``tokenizer``: use this one instead of training (its fingerprint is part of the settings).
    ``sources``: the corpus files when the caller has listed them already.
    """
    if workers < 1:
        raise ValueError(f"prepare workers ({workers}) must be >= 1")
    output = Path(output).expanduser().absolute()
    sources = list_sources(settings.data_path, settings.max_corpus_bytes) if sources is None else sources
    sig = json.loads(json.dumps(signature(settings, sources, tokenizer)))  # as it reads back from disk
    with _locked(output):
        if (output / INDEX_FILE).is_file():
            index = json.loads((output / INDEX_FILE).read_text())
            if index.get("settings") != sig:
                raise ValueError(
                    f"{output} already holds a prepared corpus made from other files or settings. Choose "
                    "another output directory, or remove it to prepare again."
                )
            logger.info("prepare: %s is already prepared", output)
            return index
        settings_file = output / _SETTINGS_FILE
        if settings_file.is_file() and json.loads(settings_file.read_text()) != sig:
            raise ValueError(
                f"{output} holds an unfinished preparation of other files or settings. Rerun it with the same "
                "ones to resume it, or remove the directory to start over."
            )
        write_json_atomic(settings_file, sig)
        tok = _resolve_tokenizer(settings, sources, output, tokenizer)
        (output / _PARTS).mkdir(exist_ok=True)
        units = make_units(sources, settings.unit_bytes)
        done = {int(p.name.split(".")[0]) for p in (output / _PARTS).glob("*.json")}
        split = {"val_fraction": settings.val_fraction, "seed": settings.seed,
                 "single_document": is_single_document(sources)}  # fmt: skip
        tokenizer_json = tok.to_str()  # one string shared by every task
        pending = [
            (i, files, tokenizer_json, str(output / _PARTS), split) for i, files in enumerate(units) if i not in done
        ]
        done_files = sum(len(u) for i, u in enumerate(units) if i in done)
        logger.info(
            "prepare: %d files (%.1f MB) of %s into %s: %d units, %d already done, %d worker(s)",
            len(sources), sum(f.size for f in sources) / 1e6, describe_data_path(settings.data_path), output,
            len(units), len(done), workers,
        )  # fmt: skip
        progress = _Progress(len(sources), done_files)
        _run_units(pending, workers, progress)
        progress.add({}, final=True)
        index = _assemble(output, sig, tok, len(units), {"data": describe_data_path(settings.data_path)})
        index["stats"] = {"seconds": progress.seconds, "tokens_this_run": progress.tokens, "workers": workers}
        logger.info(
            "prepared %.2fM train and %.2fM validation tokens (%d + %d documents) in %d shards at %s",
            index["splits"]["train"]["tokens"] / 1e6, index["splits"]["val"]["tokens"] / 1e6,
            index["splits"]["train"]["documents"], index["splits"]["val"]["documents"],
            sum(len(index["splits"][s]["shards"]) for s in SPLITS), output,
        )  # fmt: skip
        return index
