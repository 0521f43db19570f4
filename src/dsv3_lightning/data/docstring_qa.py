"""The default conversation set: questions about the standard library answered by its docstrings.

``data.conversations.path: null`` fine-tunes on pairs generated from the running Python's standard
library, present on every machine, so a fine-tune runs with nothing to download (as pretraining's
default corpus is the same library's source):

* **Files.** The ``*.py`` files the pretraining default lists (below ``sysconfig``'s ``stdlib``,
  without site-packages and the test suites; :mod:`~dsv3_lightning.data.sources`), in path order.
* **Pairs.** Each file is parsed with :mod:`ast` (nothing is imported or run). For each public
  module-level function and class (module and name without a leading underscore) with a docstring:
  the user asks ``What does json.dumps do?`` (the qualified name: the module path, ``__init__``
  meaning the package) and the assistant answers with the docstring's first paragraph, whitespace
  collapsed to single spaces. Answers shorter than ``min_chars`` or longer than ``max_chars`` are
  skipped (a stub, or a paragraph that is a whole manual page); a name defined twice in a module keeps
  its first definition; files that do not parse are skipped.
* **Bound.** At most ``max_pairs``; when there are more, those whose question has the smallest hash
  are kept (the same choice on every run), still in file order.
* **Cache.** Written once as ``{"messages": [user, assistant]}`` lines to
  ``<cache_dir>/conversations/docstring_qa-<key>/docstring_qa.jsonl``, ``key`` a hash of the files'
  paths, sizes and mtimes and of the settings above; under a temporary name, renamed into place, so
  a killed run never leaves half a file and ranks generating at once each write a whole one.

The pretraining quick start trains on these very files, docstrings included: the fine-tune does not
teach new facts so much as the question-and-answer format and where an answer ends.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from dsv3_lightning.data.sources import _list_corpus_files

logger = logging.getLogger(__name__)

_VERSION = 1  # of the generator: part of the cache key
FILE_NAME = "docstring_qa.jsonl"
_PARAGRAPH = re.compile(r"\n\s*\n")


def module_name(relative: PurePosixPath) -> str | None:
    """``json/__init__.py`` -> ``json``, ``email/mime/text.py`` -> ``email.mime.text``; None when a
    part is private (``_pyio``, ``__main__``)."""
    parts = list(relative.with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    if not parts or any(p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def first_paragraph(docstring: str) -> str:
    """The docstring's first paragraph, on one line."""
    return " ".join(_PARAGRAPH.split(docstring.strip(), maxsplit=1)[0].split())


def file_pairs(source: bytes, module: str, *, min_chars: int, max_chars: int) -> Iterator[tuple[str, str]]:
    """``(question, answer)`` for the public module-level functions and classes of one file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # Python 2 leftovers, NUL bytes
        return
    seen = set()
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_") or node.name in seen:
            continue
        seen.add(node.name)
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        answer = first_paragraph(docstring)
        if min_chars <= len(answer) <= max_chars:
            yield f"What does {module}.{node.name} do?", answer


def _hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def docstring_pairs(
    root: Path, files: Sequence[Path], *, max_pairs: int, min_chars: int, max_chars: int
) -> list[tuple[str, str]]:
    """The pairs of ``files`` (below ``root``), in path order, at most ``max_pairs`` (module docstring)."""
    pairs = []
    for path in sorted(files):
        module = module_name(PurePosixPath(path.relative_to(root).as_posix()))
        if module is not None:
            pairs += file_pairs(path.read_bytes(), module, min_chars=min_chars, max_chars=max_chars)
    if len(pairs) > max_pairs:
        kept = set(sorted(range(len(pairs)), key=lambda i: _hash(pairs[i][0]))[:max_pairs])
        pairs = [p for i, p in enumerate(pairs) if i in kept]
    return pairs


def generate_docstring_qa(
    cache_root: Path,
    *,
    root: Path | None = None,
    files: Sequence[Path] | None = None,
    max_pairs: int = 20_000,
    min_chars: int = 20,
    max_chars: int = 600,
) -> Path:
    """The ``.jsonl`` of docstring Q/A pairs, generated into ``cache_root`` unless already there.

    ``root`` and ``files`` default to the standard library's (a test passes a few files instead).
    """
    if files is None:
        root, files = _list_corpus_files(None)
    assert root is not None, "files are named relative to a root"
    listing = [
        (Path(f).relative_to(root).as_posix(), (st := os.stat(f)).st_size, st.st_mtime_ns)
        for f in sorted(files)
    ]
    settings = {"version": _VERSION, "max_pairs": max_pairs, "min_chars": min_chars, "max_chars": max_chars}
    key = hashlib.sha256(json.dumps([settings, str(root), listing]).encode("utf-8")).hexdigest()[:16]
    output = Path(cache_root).expanduser() / "conversations" / f"docstring_qa-{key}" / FILE_NAME
    if output.is_file():
        logger.info("data: docstring Q/A pairs of %s reused from %s", root, output)
        return output
    pairs = docstring_pairs(root, files, max_pairs=max_pairs, min_chars=min_chars, max_chars=max_chars)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for question, answer in pairs:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    os.replace(tmp, output)
    logger.info(
        "data: %d docstring Q/A pairs from %d files of %s written to %s", len(pairs), len(files), root, output
    )
    return output
