"""The corpus text check: files that are not text are skipped and named, a corpus of none is refused.

Random bytes are ``random.Random(0).randbytes``, so every run probes the same garbage; the NUL bytes
are taken out where a test means the printable-fraction rule rather than the NUL rule.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import pytest
from test_data import _dm, _documents, _write_corpus

import dsv3_lightning.data.sources as corpus_module

NOT_TEXT = r"NUL bytes or under 90% printable UTF-8 in the first 64 KiB"


def _noise(num_bytes: int = 100_000, *, nul: bool = True, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(num_bytes)
    return data if nul else data.replace(b"\0", b"")


def _all_documents(dm) -> list[str]:
    dm.setup("fit")
    return sorted(_documents(dm, dm.train_dataset) + _documents(dm, dm.val_dataset))


def test_files_that_are_not_text_are_skipped_counted_and_named(tmp_path: Path, caplog) -> None:
    root = tmp_path / "corpus"
    texts = _write_corpus(root, num_files=10)
    (root / "noise.txt").write_bytes(_noise(nul=False))  # no NUL: refused by the printable fraction
    (root / "sub").mkdir()
    (root / "sub" / "nul.md").write_text("a text file with one\0NUL character in it\n" * 50)
    with caplog.at_level(logging.WARNING, logger="dsv3_lightning.data.sources"):
        dm = _dm(tmp_path, root)
        assert _all_documents(dm) == sorted(texts)
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert f"skipped 2 file(s) with {NOT_TEXT}: " in warnings[0]
    assert f"{root / 'noise.txt'} (" in warnings[0] and "% printable)" in warnings[0]
    assert f"{root / 'sub' / 'nul.md'} (NUL bytes)" in warnings[0]
    assert "Remove them, or convert them to UTF-8 text to use them" in warnings[0]
    fraction = int(warnings[0].split(f"{root / 'noise.txt'} (")[1].split("%")[0])
    assert fraction < 90  # random bytes are about half undecodable

    # skipped files are no part of the cache key: without them the corpus maps to the same entry
    token_dir = dm.prepared[0].path
    (root / "noise.txt").unlink()
    (root / "sub" / "nul.md").unlink()
    clean = _dm(tmp_path, root)
    clean.setup("fit")
    assert clean.prepared[0].path == token_dir


def test_a_corpus_with_no_text_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "noise"
    root.mkdir()
    (root / "a.txt").write_bytes(_noise())
    (root / "b.py").write_bytes(_noise(nul=False, seed=1))
    with pytest.raises(
        ValueError,
        match=rf"data\.data_path \('.*noise'\) holds no text: all 2 file\(s\) have {NOT_TEXT}, e\.g\. "
        rf".*a\.txt \(NUL bytes\), .*b\.py \(\d+% printable\)\. Point data\.data_path at UTF-8 text files",
    ):
        _dm(tmp_path, root).prepare_data()
    # a single file named directly, as the issue found it: 100 KB of random bytes
    with pytest.raises(ValueError, match=rf"data\.data_path \('.*a\.txt'\) holds no text: all 1 file\(s\)"):
        _dm(tmp_path, root / "a.txt").prepare_data()


def test_more_skipped_files_than_named_are_counted(tmp_path: Path) -> None:
    root = tmp_path / "noise"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.txt").write_bytes(_noise(2_000, seed=i))
    with pytest.raises(
        ValueError, match=r"all 5 file\(s\) have .*, e\.g\. [^,]*0\.txt \([^)]*\), [^,]*1\.txt \([^)]*\), "
        r"[^,]*2\.txt \([^)]*\) and 2 more\. Point"
    ):
        _dm(tmp_path, root).prepare_data()


def test_utf8_prose_in_other_scripts_is_text(tmp_path: Path, caplog) -> None:
    root = tmp_path / "prose"
    root.mkdir()
    german = "Über die Größe der Straßen schrieb sie: »Äpfel, Öl und Übermut«.\tEnde.\r\n" * 40
    chinese = "\ufeff\u3000\u3000模型把每个词元路由到八个专家，共享专家看到全部。潜在注意力压缩键和值。\n" * 40
    # longer than the 64 KiB probe, which then ends inside a three-byte character
    long_chinese = "专家 " * 11_000 + "\n"
    with pytest.raises(UnicodeDecodeError):
        long_chinese.encode()[: 64 * 1024].decode()
    texts = {"de.txt": german, "zh.md": chinese, "long.txt": long_chinese, "en.txt": "plain words\n" * 100}
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8", newline="")
    with caplog.at_level(logging.WARNING, logger="dsv3_lightning.data.sources"):
        docs = _all_documents(_dm(tmp_path, root, val_fraction=0.25))
    assert "skipped" not in caplog.text
    long = corpus_module.SourceFile(root / "long.txt", (root / "long.txt").stat().st_size, 0)
    assert "\ufffd" not in corpus_module._probe(long)  # the cut character is left out, not an error
    assert docs == sorted(t.replace("\r\n", "\n") for t in texts.values())  # text mode reads \r\n as \n


def test_jsonl_is_checked_on_its_text_not_its_escapes(tmp_path: Path, caplog) -> None:
    root = tmp_path / "jsonl"
    root.mkdir()
    good = [f"record {i}: plain words, über alles, 专家.\n" * 20 for i in range(6)]
    (root / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good))
    binary = _noise(4_000, nul=False).decode("latin-1")  # printable JSON once escaped, binary inside
    (root / "escaped.jsonl").write_text(json.dumps({"text": binary}) + "\n")
    (root / "nul.jsonl").write_text(json.dumps({"text": "text\0with a NUL " * 10}) + "\n")
    # one record longer than the probe: the cut line is not parsed, the raw JSON text is checked
    (root / "long.jsonl").write_text(json.dumps({"text": "long plain words " * 5000}) + "\n")
    with caplog.at_level(logging.WARNING, logger="dsv3_lightning.data.sources"):
        docs = _all_documents(_dm(tmp_path, root))
    assert docs == sorted([*good, "long plain words " * 5000])
    assert "skipped 2 file(s)" in caplog.text
    assert "escaped.jsonl (" in caplog.text and "nul.jsonl (NUL bytes)" in caplog.text


def test_a_skipped_file_leaves_the_budget_to_text(tmp_path: Path, caplog) -> None:
    """Every file is larger than data.max_corpus_bytes: the one file kept is a text file."""
    root = tmp_path / "budget"
    root.mkdir()
    for i in range(3):
        (root / f"noise{i}.txt").write_bytes(_noise(3_000, seed=i))
    text = "only this file is text\n" * 200
    (root / "text.txt").write_text(text)
    with caplog.at_level(logging.WARNING, logger="dsv3_lightning.data.sources"):
        dm = _dm(tmp_path, root, max_corpus_bytes=1_000)
        assert [f.path.name for f in dm._sources(str(root))] == ["text.txt"]
    assert "data.max_corpus_bytes (1000) keeps 1 of 4 files" in caplog.text
    assert re.search(r"skipped [123] file\(s\)", caplog.text)  # those probed before text.txt, in hash order
