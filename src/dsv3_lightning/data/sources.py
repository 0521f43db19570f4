"""Sources: which files of a corpus are read, which of them are text, their documents and their split.

A corpus is a list of documents, read from files:

* **Files.** ``data.data_path`` is a text file, a ``.jsonl`` file (one JSON object per line, its
  ``"text"`` field is a document), a ``.parquet`` file (each row's ``"text"`` column is a document;
  needs pyarrow) or a directory, searched recursively for ``*.txt``, ``*.md``, ``*.py``, ``*.jsonl``
  and ``*.parquet`` files (hidden files and directories skipped, paths sorted). A text file is one
  document. When ``data_path`` is null the corpus is the running interpreter's standard library
  (``*.py`` below ``sysconfig.get_paths()["stdlib"]``, without site-packages and the test suites):
  about 12 MB of Python that needs no download.
* **Byte budget.** ``data.max_corpus_bytes`` caps the corpus by whole files, chosen in an order fixed
  by a hash of each file's relative path (the same choice on every run and machine), and warns when
  it drops any. When no text file fits in the budget, one larger one is kept rather than none.
* **Text check.** Each file the budget would keep is probed: its first 64 KiB, decoded as UTF-8
  (a ``.jsonl`` file: the ``"text"`` of the complete lines there, so that JSON escapes such as
  ``\\u0000`` cannot hide binary data). A file whose probe holds a NUL character, or under 90% of
  whose characters are printable (whitespace counts as printable; each undecodable byte counts as
  one non-printable character), is skipped, and one warning gives the count and names the first
  few with their printable fraction (its share of the budget goes to the next file); a corpus with
  no text file left is refused. Only the prefix is read, so a text file with binary data further on
  passes. The files kept are what :mod:`dsv3_lightning.data` keys its cache on: skipped files are
  not part of it, so every run probes them again, and a change to one leaves the cache valid unless
  it turns the file into text.
* **Split.** Each document goes to validation when a hash of (seed, its file's path relative to the
  corpus root, its index in the file) falls below ``val_fraction`` (:func:`document_key`): decided
  per document, so the split is the same for any number of preparation workers, files can be
  tokenized in any order, and a moved corpus splits alike. When a small corpus leaves one split
  empty, the document with the key nearest the threshold moves to it (the preparation does this). A corpus of a single plain text file is cut at the
  line boundary nearest ``1 - val_fraction`` of its length instead, head for training, tail for
  validation.

Documents are read lazily, file by file, each time they are needed (training the tokenizer, counting
the lines of a ``.jsonl`` file for the split, tokenizing), so a corpus never has to fit in memory; an
undecodable byte reads as U+FFFD. A ``.jsonl`` line that is not a JSON object with a ``"text"`` string
is refused with its path and line number.

Not supported: other file types (``*.rst``, ``*.html``, compressed files), other ``.jsonl`` or Parquet
fields than ``"text"``, and corpora read from a URL.
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
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


logger = logging.getLogger(__name__)

_CORPUS_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet")
_EXCLUDED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
# The text check (module docstring): bytes probed per file, and the printable fraction text reaches.
_PROBE_BYTES = 64 * 1024
_MIN_PRINTABLE = 0.9
_NOT_TEXT = f"NUL bytes or under {_MIN_PRINTABLE:.0%} printable UTF-8 in the first {_PROBE_BYTES // 1024} KiB"
# Whitespace of real text (and the BOM) that str.isprintable() calls non-printable; ASCII's other
# control characters (\x1c-\x1f, which str.isspace() accepts) stay non-printable.
_TEXT_WHITESPACE = re.compile("[\t\n\v\f\r\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]")


@dataclass(frozen=True)
class SourceFile:
    """A corpus file, with the size and mtime the cache keys on."""

    path: Path
    size: int
    mtime_ns: int
    name: str = ""
    """The path relative to the corpus root (POSIX): what the split hashes, so a moved corpus splits alike."""


def describe_data_path(data_path: str | None) -> str:
    """``data.data_path`` and its value, as error messages name it."""
    if data_path is None:
        return f"data.data_path (null: the standard library at {sysconfig.get_paths()['stdlib']})"
    return f"data.data_path ({data_path!r})"


def list_sources(data_path: str | None, max_corpus_bytes: int | None) -> list[SourceFile]:
    """The text files of ``data.data_path`` within ``data.max_corpus_bytes``, sorted by path.

    Warns once about the files the budget drops and once about those the text check skips; refuses
    a corpus with no files or no text file.
    """
    root, paths = _list_corpus_files(data_path)
    if not paths:
        raise ValueError(
            f"{describe_data_path(data_path)} holds no *.txt, *.md, *.py, *.jsonl or *.parquet files. Point it at a "
            "corpus, or set it to null to train on the Python standard library."
        )
    files = [SourceFile(p, (st := p.stat()).st_size, st.st_mtime_ns, p.relative_to(root).as_posix()) for p in paths]
    is_text = _TextFilter()
    kept = _within_budget(files, root, max_corpus_bytes, is_text)
    if not kept:
        raise ValueError(
            f"{describe_data_path(data_path)} holds no text: all {len(is_text.skipped)} file(s) have "
            f"{_NOT_TEXT}, e.g. {is_text.examples()}. Point data.data_path at UTF-8 text files, or set "
            "it to null to train on the Python standard library."
        )
    if is_text.skipped:
        logger.warning(
            "%s: skipped %d file(s) with %s: %s. Remove them, or convert them to UTF-8 text to use them.",
            describe_data_path(data_path), len(is_text.skipped), _NOT_TEXT, is_text.examples(),
        )  # fmt: skip
    return kept


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
    files: list[SourceFile], root: Path, max_bytes: int | None, is_text: Callable[[SourceFile], bool]
) -> list[SourceFile]:
    """Whole text files, in an order fixed by a hash of their relative paths, until ``max_bytes`` is spent.

    ``is_text`` is asked only about files the budget would keep, so the text check reads at most
    one probe per kept file, and a skipped file leaves its share of the budget to the next one.
    """
    total = sum(f.size for f in files)
    if max_bytes is None or total <= max_bytes:
        return [f for f in files if is_text(f)]

    def order(f: SourceFile) -> bytes:
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


def _probe(src: SourceFile) -> str:
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


def _not_text(src: SourceFile) -> str | None:
    """Why ``src`` is not text ("NUL bytes", "41% printable"), or None when it is. Parquet files are
    binary by design: their ``"text"`` column is checked when read."""
    if src.path.suffix == ".parquet":
        return None
    text = _probe(src)
    if "\0" in text:
        return "NUL bytes"
    fraction = _printable_fraction(text)
    return None if fraction >= _MIN_PRINTABLE else f"{math.floor(100 * fraction)}% printable"


class _TextFilter:
    """``is_text(src)``: the text check, remembering each file it refuses and why, for one report."""

    def __init__(self) -> None:
        self.skipped: list[tuple[Path, str]] = []

    def __call__(self, src: SourceFile) -> bool:
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


def _parquet_texts(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"data.data_path: {path} is a Parquet file, which needs pyarrow: pip install pyarrow"
        ) from err
    table = pq.ParquetFile(path)
    if "text" not in table.schema_arrow.names:
        raise ValueError(
            f'data.data_path: {path} has no "text" column (columns: {table.schema_arrow.names}). A Parquet '
            'corpus needs a "text" string column.'
        )
    for batch in table.iter_batches(columns=["text"], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def file_documents(src: SourceFile) -> Iterator[str]:
    """The documents of one file: the file itself, a ``.jsonl`` line's ``"text"``, a Parquet row's."""
    if src.path.suffix == ".jsonl":
        for lineno, line in _jsonl_lines(src.path):
            yield _jsonl_text(line, src.path, lineno)
    elif src.path.suffix == ".parquet":
        yield from _parquet_texts(src.path)
    else:
        yield src.path.read_text(encoding="utf-8", errors="replace")


def iter_documents(sources: Iterable[SourceFile]) -> Iterator[str]:
    for src in sources:
        yield from file_documents(src)


def document_key(seed: int, name: str, index: int) -> float:
    """A uniform number in [0, 1) for document ``index`` of file ``name``: a hash of the three. The
    document is held out for validation when it falls below ``val_fraction``; decided per document,
    so any worker can split its files alone."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def is_single_document(sources: list[SourceFile]) -> bool:
    """A corpus of one plain text file: split at a line boundary instead of by document."""
    return len(sources) == 1 and sources[0].path.suffix not in (".jsonl", ".parquet")


def split_file(
    src: SourceFile, *, val_fraction: float, seed: int, single_document: bool = False
) -> Iterator[tuple[str, bool, float]]:
    """Yield ``(text, is_validation, key)`` for every document of one file (the module docstring);
    ``key`` is :func:`document_key`, which orders documents when a split must borrow one."""
    if single_document:
        text = next(file_documents(src))
        target = int(len(text) * (1 - val_fraction))
        cut = text.rfind("\n", 0, target) + 1 or target
        yield text[:cut], False, 1.0
        yield text[cut:], True, 0.0
        return
    for index, text in enumerate(file_documents(src)):
        key = document_key(seed, src.name, index)
        yield text, key < val_fraction, key
