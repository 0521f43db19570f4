"""DSV3DataModule: a packed next-token corpus, tokenized once and memory-mapped afterwards.

Pipeline, run once per corpus and cached:

1. **Sources.** ``data.data_path`` is a text file, a ``.jsonl`` file (one JSON object per line, its
   ``"text"`` field is a document) or a directory, searched recursively for ``*.txt``, ``*.md``,
   ``*.py`` and ``*.jsonl`` files (hidden files and directories skipped, paths sorted). A text file is
   one document. When ``data_path`` is null the corpus is the running interpreter's standard library
   (``*.py`` below ``sysconfig.get_paths()["stdlib"]``, without site-packages and the test suites):
   about 12 MB of Python that needs no download. ``data.max_corpus_bytes`` caps the corpus by
   whole files, chosen in an order fixed by a hash of each file's relative path, and warns when it
   drops any.
   **Text check.** Each file the budget would keep is probed: its first 64 KiB, decoded as UTF-8
   (a ``.jsonl`` file: the ``"text"`` of the complete lines there, so that JSON escapes such as
   ``\\u0000`` cannot hide binary data). A file whose probe holds a NUL character, or under 90% of
   whose characters are printable (whitespace counts as printable; each undecodable byte counts as
   one non-printable character), is skipped, and one warning gives the count and names the first
   few with their printable fraction (its share of the budget goes to the next file); a corpus with
   no text file left is refused. Only the prefix is read, so a text file with binary data further on
   passes. Skipped files are no part of the cache keys below: every run probes them again, and a
   change to one leaves the cache valid unless it turns the file into text.
2. **Split.** A seeded permutation of the documents puts ``round(val_fraction * n)`` of them (at
   least one, at most n - 1) in the validation split: the same split on every run, for any
   number of workers or processes. A corpus of a single document is cut at the line boundary nearest
   ``1 - val_fraction`` of its length instead, head for training, tail for validation.
3. **Tokenizer.** Byte-level BPE trained on all documents (:mod:`dsv3_lightning.tokenizer`), or the
   file named by ``data.tokenizer_path``, or the one a checkpoint carries (``load_state_dict``).
4. **Packing.** Each document is tokenized and followed by ``<|eos|>``; the documents of a split are
   concatenated into one flat stream, as DeepSeek-V3 packs its pre-training sequences (no
   cross-document attention mask, no padding).
5. **Windows.** Sample ``i`` is ``stream[i * seq_len : i * seq_len + window_len]`` with
   ``window_len = seq_len + 1 + extra_tokens``: inputs ``window[:seq_len]``, next-token targets
   ``window[1:seq_len + 1]``, and the ``extra_tokens`` that follow feed the multi-token prediction
   heads (depth D needs ``extra_tokens = D``). The stride is ``seq_len``, so every token of the
   stream after the first is a next-token target exactly once (a tail shorter than a window is
   dropped); windows overlap by ``1 + extra_tokens`` tokens.

Cache layout, under ``data.cache_dir`` (default ``$DSV3_CACHE`` or ``~/.cache/dsv3_lightning``)::

    tokenizers/<sha256 of (files with sizes and mtimes, vocab_size)>/tokenizer.json
    tokens/<sha256 of (files with sizes and mtimes, tokenizer, val_fraction, seed)>/
        train.bin, val.bin    flat token ids, uint16 when vocab_size <= 65536 else uint32
        meta.json             dtype and token/document counts

Each directory is written under a temporary name and published with one ``os.replace``, so a killed
run leaves at most an orphaned ``*.tmp-*`` directory, never a half-written cache entry. The window
length is not part of the key: changing ``seq_len`` or ``extra_tokens`` reuses the cached stream.
``prepare_data`` does the one-time work (Lightning runs it on one process per node); ``setup`` maps
the files, and builds them first if ``prepare_data`` was skipped.

Training order: :class:`~dsv3_lightning.sampling.ResumableShuffleSampler` (a fresh permutation per
epoch, a function of the seed and the epoch); the checkpointed state records how many batches of the
epoch were consumed, so a resumed run continues with the next batch. The permutation is dealt to the
replicas the strategy names (``distributed_sampler_kwargs``, Lightning's seam): every process under DDP
or expert parallelism, one replica per copy of the pipeline under a pipeline strategy (its stages must
read the same windows).

Not supported: streaming corpora larger than the disk, cross-document attention masking and
per-epoch re-packing.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from dsv3_lightning.sampling import ResumableShuffleSampler
from dsv3_lightning.tokenizer import (
    eos_token_id,
    load_tokenizer,
    tokenizer_fingerprint,
    tokenizer_from_str,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

_CORPUS_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
_EXCLUDED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
# Bumped whenever the cached byte layout or the split changes, so stale entries are never read.
_CACHE_FORMAT = 1
# Characters handed to one encode_batch call: large enough to keep every core busy.
_ENCODE_BATCH_CHARS = 8_000_000
# The text check (module docstring): bytes probed per file, and the printable fraction text reaches.
_PROBE_BYTES = 64 * 1024
_MIN_PRINTABLE = 0.9
_NOT_TEXT = f"NUL bytes or under {_MIN_PRINTABLE:.0%} printable UTF-8 in the first {_PROBE_BYTES // 1024} KiB"
# Whitespace of real text (and the BOM) that str.isprintable() calls non-printable; ASCII's other
# control characters (\x1c-\x1f, which str.isspace() accepts) stay non-printable.
_TEXT_WHITESPACE = re.compile("[\t\n\v\f\r\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]")


@dataclass(frozen=True)
class _SourceFile:
    path: Path
    size: int
    mtime_ns: int


def default_cache_dir() -> Path:
    """``$DSV3_CACHE`` when set, else ``~/.cache/dsv3_lightning``."""
    return Path(os.environ.get("DSV3_CACHE") or Path.home() / ".cache" / "dsv3_lightning").expanduser()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def _walk(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Files below ``root`` ending in ``suffixes``, sorted; hidden entries and ``skip_dirs`` pruned."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(suffixes) and not f.startswith("."))
    return sorted(found)


def _list_corpus_files(data_path: str | None) -> tuple[Path, list[Path]]:
    """The corpus root (for stable relative paths) and its files, sorted."""
    if data_path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        return root, _walk(root, (".py",), _EXCLUDED_STDLIB_DIRS)
    path = Path(data_path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(
            f"data.data_path ({data_path!r}) does not exist. Point it at a text file, a .jsonl file or a "
            "directory of *.txt/*.md/*.py/*.jsonl files, or set it to null to train on the Python "
            "standard library."
        )
    if path.is_file():
        return path.parent, [path]
    return path, _walk(path, _CORPUS_SUFFIXES)


def _within_budget(
    files: list[_SourceFile], root: Path, max_bytes: int | None, is_text: Callable[[_SourceFile], bool]
) -> list[_SourceFile]:
    """Whole text files, in an order fixed by a hash of their relative paths, until ``max_bytes`` is spent.

    ``is_text`` is asked only about files the budget would keep, so the text check reads at most
    one probe per kept file, and a skipped file leaves its share of the budget to the next one.
    """
    total = sum(f.size for f in files)
    if max_bytes is None or total <= max_bytes:
        return [f for f in files if is_text(f)]

    def order(f: _SourceFile) -> bytes:
        return hashlib.sha1(f.path.relative_to(root).as_posix().encode("utf-8")).digest()

    kept, spent = [], 0
    for f in sorted(files, key=order):
        if spent + f.size <= max_bytes and is_text(f):
            kept.append(f)
            spent += f.size
    if not kept:  # every text file is larger than the budget: keep one rather than none
        larger = (f for f in sorted(files, key=order) if f.size > max_bytes and is_text(f))
        kept = list(itertools.islice(larger, 1))
        spent = sum(f.size for f in kept)
    if kept:
        logger.warning(
            "data.max_corpus_bytes (%d) keeps %d of %d files (%.1f of %.1f MB); "
            "set it to null to use them all",
            max_bytes, len(kept), len(files), spent / 1e6, total / 1e6,
        )  # fmt: skip
    return sorted(kept, key=lambda f: f.path)


def _probe(src: _SourceFile) -> str:
    """The text the check looks at: the first ``_PROBE_BYTES`` as UTF-8 (a U+FFFD per undecodable
    byte), or of a ``.jsonl`` file the ``"text"`` of the complete lines there (the raw text if none)."""
    with open(src.path, "rb") as f:
        head = f.read(_PROBE_BYTES)
    cut = src.size > len(head)  # the probe may end inside a character, and inside a line
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(head, final=not cut)
    if src.path.suffix != ".jsonl":
        return text
    texts = []
    for line in text.split("\n")[: -1 if cut else None]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # blank, cut, or reported with its line number when the corpus is read
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
    return "\n".join(texts) or text


def _printable_fraction(text: str) -> float:
    """Printable characters over all: whitespace counts as printable, U+FFFD (a decode error) does not."""
    text = _TEXT_WHITESPACE.sub(" ", text)
    if text.isprintable() and "\ufffd" not in text:  # real text: one pass at C speed
        return 1.0
    return (sum(c.isprintable() for c in text) - text.count("\ufffd")) / len(text)


def _not_text(src: _SourceFile) -> str | None:
    """Why ``src`` is not text ("NUL bytes", "41% printable"), or None when it is."""
    text = _probe(src)
    if "\0" in text:
        return "NUL bytes"
    fraction = _printable_fraction(text)
    return None if fraction >= _MIN_PRINTABLE else f"{math.floor(100 * fraction)}% printable"


class _TextFilter:
    """``is_text(src)``: the text check, remembering each file it refuses and why, for one report."""

    def __init__(self) -> None:
        self.skipped: list[tuple[Path, str]] = []

    def __call__(self, src: _SourceFile) -> bool:
        reason = _not_text(src)
        if reason is not None:
            self.skipped.append((src.path, reason))
        return reason is None

    def examples(self, limit: int = 3) -> str:
        named = ", ".join(f"{path} ({reason})" for path, reason in self.skipped[:limit])
        return named + (f" and {len(self.skipped) - limit} more" if len(self.skipped) > limit else "")


def _jsonl_text(line: str, path: Path, lineno: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"data.data_path: {path}:{lineno} is not valid JSON ({err}). Each line of a .jsonl corpus "
            'must be a JSON object with a "text" string.'
        ) from err
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f'data.data_path: {path}:{lineno} has no "text" string (found {found}). Each line of a '
            '.jsonl corpus must be a JSON object with a "text" string.'
        )
    return record["text"]


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered non-blank lines: one document each."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line


def _iter_documents(sources: Iterable[_SourceFile]) -> Iterator[str]:
    for src in sources:
        if src.path.suffix == ".jsonl":
            for lineno, line in _jsonl_lines(src.path):
                yield _jsonl_text(line, src.path, lineno)
        else:
            yield src.path.read_text(encoding="utf-8", errors="replace")


def _count_documents(sources: Iterable[_SourceFile]) -> int:
    count = 0
    for src in sources:
        if src.path.suffix == ".jsonl":
            count += sum(1 for _ in _jsonl_lines(src.path))
        else:
            count += 1
    return count


def _split_documents(
    sources: list[_SourceFile], val_fraction: float, seed: int
) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, is_validation)`` for every document, in corpus order (see the module docstring)."""
    num_documents = _count_documents(sources)
    if num_documents == 1:
        text = next(_iter_documents(sources))
        target = int(len(text) * (1 - val_fraction))
        cut = text.rfind("\n", 0, target) + 1 or target
        yield text[:cut], False
        yield text[cut:], True
        return
    num_val = min(num_documents - 1, max(1, round(val_fraction * num_documents)))
    is_val = np.zeros(num_documents, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(num_documents)[:num_val]] = True
    yield from zip(_iter_documents(sources), is_val.tolist(), strict=True)


def _encode_batch(
    tokenizer: Tokenizer, batch: list[tuple[str, bool]], *, eos: int, dtype: np.dtype, files: dict, meta: dict
) -> None:
    """Tokenize ``(text, is_validation)`` documents in parallel; append each, then eos, to its split."""
    encodings = tokenizer.encode_batch([text for text, _ in batch], add_special_tokens=False)
    for is_val, split in ((False, "train"), (True, "val")):
        ids = [enc.ids + [eos] for enc, (_, v) in zip(encodings, batch, strict=True) if v is is_val]
        stream = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype)
        stream.tofile(files[is_val])
        meta[f"{split}_tokens"] += len(stream)
        meta[f"{split}_documents"] += len(ids)


def _publish(tmp: Path, final: Path) -> None:
    """Atomically rename a finished temporary directory to its cache name."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process published the same entry first


class TokenWindows(Dataset):
    """Windows of ``window_len`` token ids, ``stride`` apart, over a flat token file.

    The memory map is opened lazily in each process and dropped when pickled, so DataLoader workers
    (fork or spawn) map the file themselves instead of copying it.
    """

    def __init__(self, path: Path, *, dtype: str, num_tokens: int, window_len: int, stride: int) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.num_tokens = num_tokens
        self.window_len = window_len
        self.stride = stride
        self.num_windows = 0 if num_tokens < window_len else (num_tokens - window_len) // stride + 1
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            if self.num_tokens == 0:  # numpy cannot map an empty file
                self._tokens = np.zeros(0, dtype=self.dtype)
            else:
                self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range for {self.num_windows} windows")
        start = index * self.stride
        return torch.from_numpy(self.tokens[start : start + self.window_len].astype(np.int64))


def data_replicas(trainer: L.Trainer | None) -> tuple[int, int]:
    """(replicas, this process's replica) of the training data: the strategy's
    ``distributed_sampler_kwargs``, or (1, 0) without a trainer or on one device."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return 1, 0
    return kwargs["num_replicas"], kwargs["rank"]


class DSV3DataModule(L.LightningDataModule):
    """Packed next-token windows from a text corpus, with a byte-level BPE tokenizer trained on it.

    The first run trains the tokenizer and tokenizes the corpus into a cache (the default standard
    library corpus takes seconds); later runs memory-map it. See the module docstring for the split,
    packing, window and cache layout.

    Args:
        data_path: A text file, a ``.jsonl`` file of ``{"text": ...}`` records, or a directory searched
            recursively for ``*.txt``, ``*.md``, ``*.py`` and ``*.jsonl`` files. Null trains on the
            ``*.py`` files of the running Python's standard library. Files that are not text (NUL
            bytes, or under 90% printable UTF-8 in their first 64 KiB) are skipped with a warning.
        tokenizer_path: A saved ``tokenizer.json`` (it must define ``<|eos|>``) to use instead of
            training a byte-level BPE tokenizer on the corpus.
        vocab_size: Size of the BPE vocabulary trained on first use, and the vocabulary the model's
            embedding and output head are built with; a tokenizer file may be smaller, never larger.
        seq_len: Model context length: tokens per training sequence.
        extra_tokens: Tokens each window carries beyond ``seq_len + 1`` for the multi-token
            prediction heads; depth D needs D.
        batch_size: Windows per batch (per process).
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of documents held out for validation, in (0, 1).
        seed: Seed of the document split and of the training shuffle.
        cache_dir: Where the tokenizer and token files are cached; null uses ``$DSV3_CACHE`` or
            ``~/.cache/dsv3_lightning``.
        max_corpus_bytes: Keep whole corpus files up to this many bytes, chosen by a hash of their
            paths; null keeps everything. A warning says how many files were dropped.
    """

    def __init__(
        self,
        *,
        data_path: str | None = None,
        tokenizer_path: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        extra_tokens: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        seed: int = 1234,
        cache_dir: str | None = None,
        max_corpus_bytes: int | None = 20_000_000,
    ) -> None:
        super().__init__()
        for key, value, minimum, meaning in (
            ("seq_len", seq_len, 1, "the model's context length, e.g. 256"),
            ("vocab_size", vocab_size, 1, "the tokenizer and embedding size, e.g. 4096"),
            ("extra_tokens", extra_tokens, 0, "0, or the multi-token prediction depth D"),
            ("batch_size", batch_size, 1, "windows per batch, e.g. 8"),
            ("num_workers", num_workers, 0, "0 to load in the main process"),
        ):
            if value < minimum:
                raise ValueError(f"data.{key} ({value}) must be >= {minimum}: set it to {meaning}.")
        if not 0 < val_fraction < 1:
            raise ValueError(
                f"data.val_fraction ({val_fraction}) must be in (0, 1): it is the fraction of documents "
                "held out for validation. 0.05 is typical."
            )
        if max_corpus_bytes is not None and max_corpus_bytes < 1:
            raise ValueError(
                f"data.max_corpus_bytes ({max_corpus_bytes}) must be positive, or null to keep every file"
            )
        self.data_path = data_path
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.extra_tokens = extra_tokens
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.cache_dir = cache_dir
        self.max_corpus_bytes = max_corpus_bytes
        self._source_files: list[_SourceFile] | None = None
        self._tokenizer: Tokenizer | None = None
        self._checkpoint_tokenizer: Tokenizer | None = None
        self._train: TokenWindows | None = None
        self._val: TokenWindows | None = None
        self._resume_position: dict[str, int] | None = None

    # ----------------------------------------------------------------------------- properties

    @property
    def window_len(self) -> int:
        """Token ids per sample: ``seq_len`` inputs, one next-token target beyond them, MTP extras."""
        return self.seq_len + 1 + self.extra_tokens

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("DSV3DataModule.tokenizer is available after prepare_data() or setup()")
        return self._tokenizer

    @property
    def eos_token_id(self) -> int:
        return eos_token_id(self.tokenizer)

    @property
    def train_dataset(self) -> TokenWindows:
        return self._require_setup(self._train)

    @property
    def val_dataset(self) -> TokenWindows:
        return self._require_setup(self._val)

    @staticmethod
    def _require_setup(dataset: TokenWindows | None) -> TokenWindows:
        if dataset is None:
            raise RuntimeError("DSV3DataModule: call setup() before asking for datasets or dataloaders")
        return dataset

    def _describe_data_path(self) -> str:
        if self.data_path is None:
            return f"data.data_path (null: the standard library at {sysconfig.get_paths()['stdlib']})"
        return f"data.data_path ({self.data_path!r})"

    # ------------------------------------------------------------------------------- caching

    def _cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()

    def _sources(self) -> list[_SourceFile]:
        if self._source_files is None:
            self._source_files = self._list_sources()
        return self._source_files

    def _list_sources(self) -> list[_SourceFile]:
        root, paths = _list_corpus_files(self.data_path)
        if not paths:
            raise ValueError(
                f"{self._describe_data_path()} holds no *.txt, *.md, *.py or *.jsonl files. Point it at a "
                "corpus, or set it to null to train on the Python standard library."
            )
        files = [_SourceFile(p, (st := p.stat()).st_size, st.st_mtime_ns) for p in paths]
        is_text = _TextFilter()
        kept = _within_budget(files, root, self.max_corpus_bytes, is_text)
        if not kept:
            raise ValueError(
                f"{self._describe_data_path()} holds no text: all {len(is_text.skipped)} file(s) have "
                f"{_NOT_TEXT}, e.g. {is_text.examples()}. Point data.data_path at UTF-8 text files, or set "
                "it to null to train on the Python standard library."
            )
        if is_text.skipped:
            logger.warning(
                "%s: skipped %d file(s) with %s: %s. Remove them, or convert them to UTF-8 text to use them.",
                self._describe_data_path(), len(is_text.skipped), _NOT_TEXT, is_text.examples(),
            )  # fmt: skip
        return kept

    @staticmethod
    def _signature(sources: list[_SourceFile]) -> list[tuple[str, int, int]]:
        return [(str(f.path), f.size, f.mtime_ns) for f in sources]

    def _resolve_tokenizer(self, sources: list[_SourceFile]) -> Tokenizer:
        if self._checkpoint_tokenizer is not None:
            tokenizer = self._checkpoint_tokenizer
            source = "the checkpoint's tokenizer"
        elif self.tokenizer_path is not None:
            tokenizer = load_tokenizer(self.tokenizer_path)
            source = f"data.tokenizer_path ({self.tokenizer_path!r})"
        else:
            key = _hash(
                {"format": _CACHE_FORMAT, "files": self._signature(sources), "vocab": self.vocab_size}
            )
            path = self._cache_root() / "tokenizers" / key / "tokenizer.json"
            if path.is_file():
                return tokenizer_from_str(path.read_text(encoding="utf-8"), source=f"cached tokenizer {path}")
            num_bytes = sum(f.size for f in sources)
            logger.info(
                "training a %d-token byte-level BPE tokenizer on %d files (%.1f MB)",
                self.vocab_size, len(sources), num_bytes / 1e6,
            )  # fmt: skip
            start = time.perf_counter()
            tokenizer = train_tokenizer(_iter_documents(sources), vocab_size=self.vocab_size)
            path.parent.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=path.parent.parent))
            tokenizer.save(str(tmp / "tokenizer.json"))
            _publish(tmp, path.parent)
            logger.info("trained the tokenizer in %.1f s, cached at %s", time.perf_counter() - start, path)
            return tokenizer
        if tokenizer.get_vocab_size() > self.vocab_size:
            raise ValueError(
                f"{source} has {tokenizer.get_vocab_size()} tokens, more than data.vocab_size "
                f"({self.vocab_size}), the size of the model's embedding. Raise data.vocab_size to at least "
                f"{tokenizer.get_vocab_size()}, or use a smaller tokenizer."
            )
        eos_token_id(tokenizer, source=source)
        return tokenizer

    def _token_dir(self, sources: list[_SourceFile], tokenizer: Tokenizer) -> Path:
        key = _hash(
            {
                "format": _CACHE_FORMAT,
                "files": self._signature(sources),
                "tokenizer": tokenizer_fingerprint(tokenizer),
                "val_fraction": self.val_fraction,
                "seed": self.seed,
            }
        )
        return self._cache_root() / "tokens" / key

    def _token_dtype(self) -> str:
        return "uint16" if self.vocab_size <= 2**16 else "uint32"

    def _build_tokens(self, sources: list[_SourceFile], tokenizer: Tokenizer, out: Path) -> None:
        num_bytes = sum(f.size for f in sources)
        logger.info("tokenizing %d files (%.1f MB) into %s", len(sources), num_bytes / 1e6, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
        try:
            meta = self._write_tokens(tmp, sources, tokenizer, num_bytes)
            if meta["train_tokens"] + meta["val_tokens"] == meta["train_documents"] + meta["val_documents"]:
                raise ValueError(
                    f"{self._describe_data_path()} holds no text: every document is empty. Point it at a "
                    "corpus with text in it."
                )
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info(
            "cached %.2fM train and %.2fM validation tokens (%d + %d documents) at %s",
            meta["train_tokens"] / 1e6, meta["val_tokens"] / 1e6,
            meta["train_documents"], meta["val_documents"], out,
        )  # fmt: skip

    def _write_tokens(
        self, tmp: Path, sources: list[_SourceFile], tokenizer: Tokenizer, num_bytes: int
    ) -> dict:
        """Stream the documents through the tokenizer into ``train.bin`` and ``val.bin``."""
        dtype = np.dtype(self._token_dtype())
        eos = eos_token_id(tokenizer)
        meta: dict[str, Any] = {"dtype": dtype.name}
        meta.update(dict.fromkeys(["train_tokens", "val_tokens", "train_documents", "val_documents"], 0))
        start = last_log = time.perf_counter()
        done_chars = 0
        with open(tmp / "train.bin", "wb") as train_file, open(tmp / "val.bin", "wb") as val_file:
            files = {False: train_file, True: val_file}
            batch: list[tuple[str, bool]] = []
            chars = 0
            for document in itertools.chain(_split_documents(sources, self.val_fraction, self.seed), [None]):
                if document is not None:
                    batch.append(document)
                    chars += len(document[0])
                if batch and (document is None or chars >= _ENCODE_BATCH_CHARS):
                    _encode_batch(tokenizer, batch, eos=eos, dtype=dtype, files=files, meta=meta)
                    done_chars += chars
                    batch, chars = [], 0
                    if time.perf_counter() - last_log > 10:
                        last_log = time.perf_counter()
                        logger.info("tokenized %.1f of about %.1f MB", done_chars / 1e6, num_bytes / 1e6)
        logger.info("tokenized %.1f MB in %.1f s", done_chars / 1e6, time.perf_counter() - start)
        return meta

    def _prepare(self) -> tuple[Tokenizer, Path]:
        sources = self._sources()
        tokenizer = self._resolve_tokenizer(sources)
        token_dir = self._token_dir(sources, tokenizer)
        if not (token_dir / "meta.json").is_file():
            self._build_tokens(sources, tokenizer, token_dir)
        return tokenizer, token_dir

    # ------------------------------------------------------------------------ Lightning hooks

    @override
    def prepare_data(self) -> None:
        self._tokenizer, _ = self._prepare()

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        tokenizer, token_dir = self._prepare()
        meta = json.loads((token_dir / "meta.json").read_text())
        train, val = (
            TokenWindows(
                token_dir / f"{split}.bin",
                dtype=meta["dtype"],
                num_tokens=meta[f"{split}_tokens"],
                window_len=self.window_len,
                stride=self.seq_len,
            )
            for split in ("train", "val")
        )
        window = f"{self.window_len} tokens (data.seq_len {self.seq_len} + 1 + data.extra_tokens "
        window += f"{self.extra_tokens})"
        if len(val) < 1:
            raise ValueError(
                f"{self._describe_data_path()} gives {val.num_tokens} validation tokens, fewer than one "
                f"window of {window}. Lower data.seq_len, raise data.val_fraction ({self.val_fraction}) or "
                "add text."
            )
        if len(train) < self.batch_size:
            raise ValueError(
                f"{self._describe_data_path()} gives {len(train)} training windows of {window}, fewer than "
                f"data.batch_size ({self.batch_size}). Lower data.seq_len or data.batch_size, or add text."
            )
        logger.info(
            "data: %d train and %d validation windows of %d tokens from %s",
            len(train), len(val), self.window_len, token_dir,
        )  # fmt: skip
        self._tokenizer, self._train, self._val = tokenizer, train, val

    @override
    def train_dataloader(self) -> DataLoader:
        replicas, rank = data_replicas(self.trainer)
        sampler = ResumableShuffleSampler(
            self.train_dataset, num_replicas=replicas, rank=rank, seed=self.seed, batch_size=self.batch_size
        )
        position = self._resume_position
        if position is not None:
            if (position["batch_size"], position["world_size"]) == (self.batch_size, sampler.num_replicas):
                sampler.resume_at(position["epoch"], position["batches_done"])
            else:
                logger.warning(
                    "resuming with another data.batch_size or number of processes than the checkpoint "
                    "(%d x %d): the current epoch restarts from its first batch",
                    position["batch_size"],
                    position["world_size"],
                )
            self._resume_position = None
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    @override
    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # --------------------------------------------------------------------------- checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._tokenizer is None:
            return {}
        state: dict[str, Any] = {"tokenizer_json": self._tokenizer.to_str(), "vocab_size": self.vocab_size}
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            # ``processed`` counts the batch whose end hooks are saving this checkpoint.
            state["position"] = {
                "epoch": trainer.current_epoch,
                "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                "batch_size": self.batch_size,
                "world_size": data_replicas(trainer)[0],  # the sampler's replicas (the name is the format's)
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt the checkpoint's tokenizer, re-tokenizing the corpus if it differs from the current one.

        Lightning restores a datamodule after ``setup``; a run resumed with another tokenizer would
        otherwise feed token ids the checkpointed model never saw.
        """
        self._resume_position = state_dict.get("position")
        if "tokenizer_json" not in state_dict:
            return
        tokenizer = tokenizer_from_str(state_dict["tokenizer_json"], source="the checkpoint's tokenizer")
        if tokenizer.get_vocab_size() > self.vocab_size:
            raise ValueError(
                f"the checkpoint's tokenizer has {tokenizer.get_vocab_size()} tokens, more than "
                f"data.vocab_size ({self.vocab_size}). Set data.vocab_size to the checkpoint's "
                f"({state_dict.get('vocab_size')})."
            )
        current = self._tokenizer
        self._checkpoint_tokenizer = tokenizer
        if current is not None and tokenizer_fingerprint(current) == tokenizer_fingerprint(tokenizer):
            return
        self._tokenizer = tokenizer
        if self._train is not None:
            logger.warning(
                "the checkpoint's tokenizer differs from the one built from data.*: re-tokenizing the corpus "
                "with the checkpoint's. Set data.tokenizer_path to a saved copy of it to skip this."
            )
            self._train = self._val = None
            self.setup()

    # ------------------------------------------------------------------------------ baseline

    def unigram_loss(self) -> float:
        """Cross-entropy (nats/token) of an add-one unigram model on the validation targets.

        Token frequencies come from the whole train stream, smoothed over ``vocab_size`` (the model's
        output size); the targets are ``stream[1 : num_windows * seq_len + 1]`` of the validation
        split, the tokens the model is scored on. A trained model must beat this.
        """
        train, val = self.train_dataset, self.val_dataset
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for start in range(0, train.num_tokens, 1 << 24):  # chunked: the train stream may exceed RAM
            counts += np.bincount(train.tokens[start : start + (1 << 24)], minlength=self.vocab_size)
        log_probs = np.log((counts + 1.0) / (counts.sum() + self.vocab_size))
        targets = np.asarray(val.tokens[1 : len(val) * self.seq_len + 1], dtype=np.int64)
        return float(-log_probs[targets].mean())


def windows_in_batch(batch: torch.Tensor) -> int:
    """Windows in a batch: ``ThroughputMonitor(batch_size_fn=...)`` for samples/s."""
    return batch.shape[0]


def targets_in_batch(batch: torch.Tensor) -> int:
    """Next-token targets in a batch (``ThroughputMonitor(length_fn=...)`` for tokens/s).

    Counts ``window_len - 1`` per window, which is exactly the trained positions when
    ``extra_tokens`` is 0 and overcounts by ``extra_tokens`` per window otherwise.
    """
    return batch.shape[0] * (batch.shape[1] - 1)
