"""dsv3 prepare: the same shards for any number of workers, resuming a killed preparation, shards of a
fixed size read as one stream, Parquet and jsonl input, the command line, and mixtures in training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import dsv3_lightning.data.prepare as prepare_module
from dsv3_lightning.cli import main as dsv3
from dsv3_lightning.data import DSV3DataModule, PrepareSettings, open_prepared, prepare_corpus
from dsv3_lightning.data.store import verify_checksums
from dsv3_lightning.tokenizer import train_tokenizer

from test_data import _text, _write_corpus


def _tree(root: Path) -> dict[str, bytes]:
    """Every file of a prepared directory but the lock, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _settings(root: Path, **kwargs) -> PrepareSettings:
    defaults = dict(data_path=str(root), vocab_size=300, val_fraction=0.2, shard_tokens=4000, unit_bytes=5000)
    return PrepareSettings(**{**defaults, **kwargs})


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "corpus"
    texts = _write_corpus(root, num_files=24, num_words=300)
    records = [_text(random.Random(i), 80) for i in range(40)]
    (root / "records.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    return root, texts + records


def test_workers_make_the_same_bytes_and_shards_have_a_fixed_size(corpus, tmp_path: Path) -> None:
    root, docs = corpus
    index = prepare_corpus(_settings(root), tmp_path / "one", workers=1)
    prepare_corpus(_settings(root), tmp_path / "two", workers=2)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] == 4000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 4000
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == len(docs)
    corpus_ = open_prepared(tmp_path / "one")
    assert verify_checksums(corpus_) == 2 * sum(index["splits"][s]["tokens"] for s in ("train", "val"))
    # The shards read back as one stream holding every document once, each followed by eos.
    tok = corpus_.tokenizer
    eos = index["tokenizer"]["eos_token_id"]
    decoded = []
    for split in ("train", "val"):
        store = corpus_.splits[split]
        stream = store.read(0, store.num_tokens)
        cuts = np.flatnonzero(stream == eos)
        decoded += [tok.decode(stream[a + 1 : b].tolist()) for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]
    assert sorted(decoded) == sorted(docs)
    # A window across a shard boundary is the stream's slice.
    store = corpus_.splits["train"]
    assert np.array_equal(store.read(3990, 20), np.concatenate([store.read(3990, 10), store.read(4000, 10)]))


def test_a_killed_preparation_resumes_without_losing_or_repeating_documents(corpus, tmp_path: Path, monkeypatch) -> None:
    root, _ = corpus
    prepare_corpus(_settings(root), tmp_path / "whole", workers=1)
    real, calls = prepare_module.tokenize_unit, []

    def killed_after_three(task):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the kill: in the middle of the fourth unit
        calls.append(task[0])
        return real(task)

    monkeypatch.setattr(prepare_module, "tokenize_unit", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(_settings(root), tmp_path / "resumed", workers=1)
    assert not (tmp_path / "resumed" / "index.json").exists()
    assert len(list((tmp_path / "resumed" / "parts").glob("*.json"))) == 3
    monkeypatch.undo()
    redone = []
    monkeypatch.setattr(prepare_module, "tokenize_unit", lambda task: redone.append(task[0]) or real(task))
    prepare_corpus(_settings(root), tmp_path / "resumed", workers=1)
    assert redone and not set(redone) & set(calls)  # only the units without a record are redone
    assert _tree(tmp_path / "resumed") == _tree(tmp_path / "whole")
    # Rerunning a finished preparation returns its index without work; other settings are refused.
    assert prepare_corpus(_settings(root), tmp_path / "whole")["splits"]["train"]["tokens"] > 0
    with pytest.raises(ValueError, match=r"already holds a prepared corpus made from other files or settings"):
        prepare_corpus(_settings(root, seed=7), tmp_path / "whole")


def test_an_unfinished_preparation_of_other_settings_is_refused(corpus, tmp_path: Path, monkeypatch) -> None:
    root, _ = corpus
    monkeypatch.setattr(prepare_module, "tokenize_unit", lambda task: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(_settings(root), tmp_path / "out")
    with pytest.raises(ValueError, match=r"holds an unfinished preparation of other files or settings"):
        prepare_corpus(_settings(root, val_fraction=0.3), tmp_path / "out")


def test_parquet_documents_are_its_text_column(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    texts = [_text(random.Random(i), 50) for i in range(30)]
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"id": list(range(30)), "text": texts}), tmp_path / "c" / "part.parquet")
    prepare_corpus(_settings(tmp_path / "c"), tmp_path / "out")
    corpus_ = open_prepared(tmp_path / "out")
    docs = corpus_.index["splits"]["train"]["documents"] + corpus_.index["splits"]["val"]["documents"]
    assert docs == 30
    pq.write_table(pa.table({"body": texts}), tmp_path / "c" / "part.parquet")
    with pytest.raises(ValueError, match=r'part\.parquet has no "text" column \(columns: \[\'body\'\]\)'):
        prepare_corpus(_settings(tmp_path / "c"), tmp_path / "out2")


def test_the_command_line_with_a_given_tokenizer_and_verify(corpus, tmp_path: Path, capsys) -> None:
    root, docs = corpus
    hf_dir = tmp_path / "hf_checkpoint"
    hf_dir.mkdir()
    train_tokenizer(docs, vocab_size=290).save(str(hf_dir / "tokenizer.json"))
    out = tmp_path / "prepared"
    dsv3(["prepare", str(root), "--output", str(out), "--workers", "2", "--tokenizer", str(hf_dir),
          "--shard_tokens", "3000", "--val_fraction", "0.2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"{out}: " in printed and "tokens/s tokenizing with 2 worker(s)" in printed
    corpus_ = open_prepared(out)
    assert corpus_.vocab_size == 290 and (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    dsv3(["prepare", "--verify", str(out)])
    assert "every shard matches index.json" in capsys.readouterr().out
    # Training reads it as data.data_path: no tokenizer is trained, nothing is tokenized.
    dm = DSV3DataModule(data_path=str(out), vocab_size=300, seq_len=16, batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert dm.tokenizer.get_vocab_size() == 290 and not (tmp_path / "cache").exists()
    assert next(iter(dm.train_dataloader())).shape == (2, 17)


def test_a_mixture_trains_on_both_corpora_by_weight(tmp_path: Path) -> None:
    code, text = tmp_path / "code", tmp_path / "text"
    _write_corpus(code, num_files=10, num_words=200, seed=1)
    _write_corpus(text, num_files=10, num_words=600, seed=2)
    docs = []
    for root in (code, text):
        docs += [p.read_text() for p in sorted(root.iterdir())]
    tokenizer = train_tokenizer(docs, vocab_size=300)
    tokenizer.save(str(tmp_path / "tok.json"))
    for root in (code, text):
        prepare_corpus(_settings(root), tmp_path / "prepared" / root.name, tokenizer=tokenizer)
    mixture = {str(tmp_path / "prepared" / "code"): 0.3, str(tmp_path / "prepared" / "text"): 0.7}
    dm = DSV3DataModule(mixture=mixture, vocab_size=300, seq_len=16, batch_size=64, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    first = len(dm._train[0])
    sampler = dm.train_dataloader().sampler
    stream = sampler.order(np.arange(3 * 4096))  # the stream runs on past an epoch of this small mixture
    assert [(block < first).sum() for block in stream.reshape(3, 4096)] == [1229] * 3  # 0.3 of each block
    assert sorted(set(stream.tolist())) == list(range(len(dm.train_dataset)))  # both corpora, every window
    assert len(list(iter(sampler))) == len(dm.train_dataset) // 64 * 64
    assert len(dm.val_dataset) == len(dm._val[0]) + len(dm._val[1])
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (64, 17) and batch.dtype == torch.int64
