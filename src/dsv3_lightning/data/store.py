"""The token store: a prepared corpus on disk, as fixed-size shards of token ids plus one index.

Layout of a prepared directory (``dsv3 prepare`` writes it, every rank of a training job reads it)::

    index.json          the format tag, token dtype, the tokenizer's fingerprint and vocabulary size,
                        the settings that made it, and per split its shards
    tokenizer.json      the tokenizer the ids belong to
    train/000000.bin    flat token ids (uint16 when the vocabulary fits, else uint32); each document
    train/000001.bin    is followed by ``<|eos|>`` and documents are packed back to back across shard
    ...                 boundaries; every shard but the last holds exactly ``shard_tokens`` ids
    val/000000.bin

Each shard entry records its file, token count and SHA-256. Opening a store (``open_prepared``)
checks what costs no reading: the format, that every shard exists with the size its count implies
(a truncated or padded shard is named), and that the counts add up to the split's; the tokenizer
file must match the index's fingerprint. ``verify_checksums`` reads every byte (``dsv3 prepare
--verify``). Reading a window checks its ids against the vocabulary, so corruption that slipped
through is reported with its shard instead of indexing past the embedding.

A split reads as one virtual stream: window ``i`` is ``stream[i * stride : i * stride + window_len]``
(:class:`TokenWindows`), which may span two shards. Shards are memory-mapped lazily in each process
and dropped when pickled, so DataLoader workers map them themselves; a rank holds the index (a few
numbers per shard) and the pages it touches, whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from dsv3_lightning.tokenizer import tokenizer_fingerprint, tokenizer_from_str

INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "dsv3-tokens/1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a directory that ``dsv3 prepare`` finished (its index is written last)."""
    return (Path(path).expanduser() / INDEX_FILE).is_file()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class ShardWriter:
    """Appends token arrays to ``<root>/<split>/NNNNNN.bin`` files of exactly ``shard_tokens`` ids.

    Each shard is written under a temporary name and renamed when full (or at ``close``), with its
    SHA-256 computed on the way; ``shards`` lists the finished ones for the index.
    """

    def __init__(self, root: Path, split: str, *, shard_tokens: int, dtype: np.dtype) -> None:
        self.dir = root / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._filled = 0

    def _open(self) -> None:
        name = f"{len(self.shards):06d}.bin"
        self._path = self.dir / name
        self._tmp = self.dir / f".{name}.tmp"
        self._file = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._filled = 0

    def _finish(self) -> None:
        self._file.close()
        os.replace(self._tmp, self._path)
        self.shards.append(
            {"file": f"{self.split}/{self._path.name}", "tokens": self._filled, "sha256": self._sha.hexdigest()}
        )
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._file is None:
                self._open()
            take = tokens[: self.shard_tokens - self._filled]
            data = take.tobytes()
            self._file.write(data)
            self._sha.update(data)
            self._filled += take.size
            tokens = tokens[take.size :]
            if self._filled == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish()
        return self.shards


class TokenStore:
    """One split of a prepared corpus as a virtual flat stream over its shards."""

    def __init__(self, root: Path, shards: list[dict[str, Any]], *, dtype: np.dtype, vocab_size: int) -> None:
        self.root = root
        self.files = [root / s["file"] for s in shards]
        self.counts = np.array([s["tokens"] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.dtype = dtype
        self.vocab_size = vocab_size
        self._maps: dict[int, np.ndarray] = {}

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            count = (int(self.counts[shard]),)
            self._maps[shard] = np.memmap(self.files[shard], dtype=self.dtype, mode="r", shape=count)
        return self._maps[shard]

    def read(self, start: int, length: int) -> np.ndarray:
        """``stream[start : start + length]`` (across shard boundaries), as int64, range-checked."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {self.num_tokens}")
        pieces, first = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        shard, pos, left = first, start, length
        while left > 0:
            offset = pos - int(self.starts[shard])
            take = min(left, int(self.counts[shard]) - offset)
            pieces.append(self._map(shard)[offset : offset + take])
            pos, left, shard = pos + take, left - take, shard + 1
        out = np.concatenate(pieces).astype(np.int64) if len(pieces) != 1 else pieces[0].astype(np.int64)
        if out.size and int(out.max()) >= self.vocab_size:
            bad = self.files[int(np.searchsorted(self.starts, start + int(out.argmax()), side="right")) - 1]
            raise ValueError(
                f"{bad} holds token id {int(out.max())}, outside the tokenizer's {self.vocab_size} ids: the "
                "shard is corrupt. Check it with `dsv3 prepare --verify <dir>` and prepare the corpus again."
            )
        return out

    def chunks(self, size: int = 1 << 24):
        """The whole stream in pieces of at most ``size`` ids (for statistics over a split)."""
        for start in range(0, self.num_tokens, size):
            yield self.read(start, min(size, self.num_tokens - start))


class TokenWindows(Dataset):
    """Windows of ``window_len`` token ids, ``stride`` apart, over a split's stream."""

    def __init__(self, store: TokenStore, *, window_len: int, stride: int) -> None:
        self.store = store
        self.window_len = window_len
        self.stride = stride
        num_tokens = store.num_tokens
        self.num_tokens = num_tokens
        self.num_windows = 0 if num_tokens < window_len else (num_tokens - window_len) // stride + 1

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range for {self.num_windows} windows")
        return torch.from_numpy(self.store.read(index * self.stride, self.window_len))


@dataclass
class PreparedCorpus:
    """An opened prepared directory: its index, tokenizer and one :class:`TokenStore` per split."""

    path: Path
    index: dict[str, Any]
    tokenizer: Tokenizer
    splits: dict[str, TokenStore]

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])


def _refuse(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"prepared corpus {path}: {problem}. Prepare it again (`dsv3 prepare <corpus> --output {path}` after "
        "removing it), or point data.data_path at another prepared directory."
    )


def open_prepared(path: str | Path) -> PreparedCorpus:
    """Open a prepared directory, checking everything that needs no reading of the shards."""
    root = Path(path).expanduser().absolute()
    try:
        index = json.loads((root / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _refuse(root, f"{INDEX_FILE} cannot be read ({err})") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise _refuse(root, f"{INDEX_FILE} is not a {FORMAT} index (format {index.get('format')!r})")
    tok_path = root / TOKENIZER_FILE
    if not tok_path.is_file():
        raise _refuse(root, f"{TOKENIZER_FILE} is missing")
    tokenizer = tokenizer_from_str(tok_path.read_text(encoding="utf-8"), source=str(tok_path))
    if tokenizer_fingerprint(tokenizer) != index["tokenizer"]["fingerprint"]:
        raise _refuse(root, f"{tok_path} is not the tokenizer the shards were made with (fingerprint differs)")
    dtype = np.dtype(index["dtype"])
    splits = {}
    for split in SPLITS:
        entry = index["splits"][split]
        total = 0
        for shard in entry["shards"]:
            file = root / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not file.is_file():
                raise _refuse(root, f"shard {file} listed in {INDEX_FILE} is missing")
            size = file.stat().st_size
            if size != expected:
                kind = "truncated" if size < expected else "longer than its index entry"
                raise _refuse(root, f"shard {file} is {kind}: {size} bytes, the index says {expected}")
            total += shard["tokens"]
        if total != entry["tokens"]:
            raise _refuse(root, f"the {split} shards hold {total} tokens, the index says {entry['tokens']}")
        splits[split] = TokenStore(root, entry["shards"], dtype=dtype, vocab_size=tokenizer.get_vocab_size())
    return PreparedCorpus(root, index, tokenizer, splits)


def verify_checksums(corpus: PreparedCorpus) -> int:
    """Read every shard and compare its SHA-256 with the index; returns the bytes read."""
    read = 0
    for split in SPLITS:
        for shard in corpus.index["splits"][split]["shards"]:
            file = corpus.path / shard["file"]
            sha = hashlib.sha256()
            with open(file, "rb") as f:
                while block := f.read(1 << 22):
                    sha.update(block)
                    read += len(block)
            if sha.hexdigest() != shard["sha256"]:
                raise _refuse(corpus.path, f"shard {file} is corrupt: its SHA-256 differs from the index's")
    return read
