"""Contracts of the tokenizer and DSV3DataModule: packing, split, cache, baseline, errors, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import dsv3_lightning.data.module as data_module
import dsv3_lightning.data.prepare as prepare_module
from dsv3_lightning.data import DSV3DataModule, TokenWindows, default_cache_dir
from dsv3_lightning.data.sources import document_key
from dsv3_lightning.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    eos_token_id,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

_WORDS = (
    "the model routes each token to eight of many experts while a shared expert sees all of them "
    "latent attention compresses keys and values into one small vector per position and the cache "
    "stays tiny def return import class self if else for while yield lambda"
).split()


def _text(rng: random.Random, num_words: int) -> str:
    lines, line = [], []
    for _ in range(num_words):
        line.append(rng.choice(_WORDS))
        if len(line) >= rng.randint(5, 12):
            lines.append(" ".join(line) + rng.choice([".", ",", ":", "!"]))
            line = []
    return "\n".join(lines + [" ".join(line)]) + "\n"


def _write_corpus(root: Path, num_files: int = 20, num_words: int = 400, seed: int = 0) -> list[str]:
    """``num_files`` text files of about ``6 * num_words`` bytes each; returns their texts in path order."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(num_files):
        text = _text(rng, num_words)
        (root / f"doc{i:03d}.txt").write_text(text)
        texts.append(text)
    return texts


def _dm(tmp_path: Path, data_path: Path | str | None, **kwargs) -> DSV3DataModule:
    defaults = dict(
        vocab_size=300, seq_len=16, batch_size=2, val_fraction=0.2, cache_dir=str(tmp_path / "cache")
    )
    return DSV3DataModule(data_path=None if data_path is None else str(data_path), **{**defaults, **kwargs})


def _stream(dataset: TokenWindows) -> np.ndarray:
    """A split's whole token stream, across its shards."""
    return dataset.store.read(0, dataset.store.num_tokens)


def _documents(dm: DSV3DataModule, dataset: TokenWindows) -> list[str]:
    """Decode a packed split back into its documents (the stream ends with an eos)."""
    stream = _stream(dataset).tolist()
    assert stream[-1] == dm.eos_token_id
    docs, current = [], []
    for token in stream:
        if token == dm.eos_token_id:
            docs.append(dm.tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return docs


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "corpus"
    return root, _write_corpus(root)


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trips_text_and_fixes_special_ids(tmp_path: Path) -> None:
    texts = _write_corpus(tmp_path / "c", num_files=5)
    tokenizer = train_tokenizer(texts, vocab_size=400)
    assert tokenizer.token_to_id(BOS_TOKEN) == 0 and tokenizer.token_to_id(EOS_TOKEN) == 1
    assert eos_token_id(tokenizer) == 1
    assert 258 < tokenizer.get_vocab_size() <= 400
    for text in [*texts[:2], "  def f(x):\n\treturn x ** 2  # ünïcödé, 中文, emoji 🚀\r\n", ""]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(texts[0]).ids) < len(texts[0].encode()) / 2  # merges were learned
    tokenizer.save(str(tmp_path / "tok.json"))
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "tok.json")) == tokenizer_fingerprint(tokenizer)


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.vocab_size \(100\) must be at least 258"):
        train_tokenizer(["hello"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer_path \('.*nope\.json'\) does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"data\.tokenizer_path \('.*bad\.json'\) is not a valid"):
        load_tokenizer(tmp_path / "bad.json")
    no_eos = Tokenizer.from_str(
        train_tokenizer(["hello world"], vocab_size=260).to_str().replace(EOS_TOKEN, "<x>")
    )
    no_eos.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(ValueError, match=r"has no <\|eos\|> token"):
        load_tokenizer(tmp_path / "no_eos.json")


# ------------------------------------------------------------------------- packing and windows


@pytest.mark.parametrize("extra_tokens", [0, 2])
def test_windows_are_packed_documents_with_aligned_targets(corpus, tmp_path: Path, extra_tokens: int) -> None:
    root, texts = corpus
    dm = _dm(tmp_path, root, extra_tokens=extra_tokens)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.window_len == 16 + 1 + extra_tokens
    train, val = dm.train_dataset, dm.val_dataset
    stream = torch.from_numpy(_stream(train))
    for i in range(len(train)):
        window = train[i]
        assert window.dtype == torch.int64 and window.shape == (dm.window_len,)
        # Stride seq_len: window i is stream[16 i : 16 i + window_len], so window[1:] are the next tokens
        # of window[:-1] and the last target of window i is the first input of window i + 1.
        torch.testing.assert_close(window, stream[16 * i : 16 * i + dm.window_len], rtol=0, atol=0)
        if i + 1 < len(train):
            torch.testing.assert_close(window[16:], train[i + 1][: 1 + extra_tokens], rtol=0, atol=0)
    assert len(train) == (len(stream) - dm.window_len) // 16 + 1
    # Every document appears once, whole, followed by eos, in one of the two splits.
    train_docs, val_docs = _documents(dm, train), _documents(dm, val)
    assert sorted(train_docs + val_docs) == sorted(texts)
    # The split is per document, by a hash of (seed, file, index): the one predicted.
    expected_val = [t for i, t in enumerate(texts) if document_key(1234, f"doc{i:03d}.txt", 0) < 0.2]
    assert sorted(val_docs) == sorted(expected_val) and 0 < len(val_docs) < len(texts)
    assert train_docs == [t for t in texts if t in train_docs]  # corpus order is kept


def test_dataloaders(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    dm = _dm(tmp_path, root, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, dm.window_len) and batch.dtype == torch.int64
    assert len(dm.train_dataloader()) == len(dm.train_dataset) // 4  # drop_last
    val_batch = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(val_batch, torch.stack([dm.val_dataset[i] for i in range(4)]), rtol=0, atol=0)
    # The shuffle is seeded: a fresh DataModule draws the same batches, and the order is not the identity.
    again = _dm(tmp_path, root, batch_size=4)
    again.setup("fit")
    torch.testing.assert_close(next(iter(again.train_dataloader())), batch, rtol=0, atol=0)
    assert not torch.equal(batch, torch.stack([dm.train_dataset[i] for i in range(4)]))


def test_training_windows_are_dealt_to_the_strategys_replicas(corpus, tmp_path: Path) -> None:
    """The sampler follows the strategy's ``distributed_sampler_kwargs``, not the world size: a pipeline
    strategy names one replica per copy of the pipeline, whose stages must all read its windows."""
    root, _ = corpus
    batches = []
    for rank in range(2):
        dm = _dm(tmp_path, root, batch_size=2)
        dm.setup("fit")
        strategy = type("Strategy", (), {"distributed_sampler_kwargs": {"num_replicas": 2, "rank": rank}})()
        dm.trainer = type("Trainer", (), {"strategy": strategy})()  # what the sampler reads of a Trainer
        loader = dm.train_dataloader()
        assert (loader.sampler.num_replicas, loader.sampler.rank) == (2, rank)
        batches.append(next(iter(loader)))
    assert not torch.equal(batches[0], batches[1])
    assert data_module.data_replicas(None) == (1, 0)


def test_workers_see_the_same_data(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    dm, dm2 = _dm(tmp_path, root), _dm(tmp_path, root, num_workers=2)
    dm.setup("fit")
    dm2.setup("fit")
    for a, b in zip(dm.train_dataloader(), dm2.train_dataloader(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- split and cache


def test_split_is_deterministic_across_fresh_caches(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    streams = []
    for run in range(2):
        dm = _dm(tmp_path, root, cache_dir=str(tmp_path / f"cache{run}"))
        dm.setup("fit")
        streams.append((_stream(dm.train_dataset), _stream(dm.val_dataset)))
    np.testing.assert_array_equal(streams[0][0], streams[1][0])
    np.testing.assert_array_equal(streams[0][1], streams[1][1])
    # Another seed draws another split of the same documents.
    other = _dm(tmp_path, root, seed=7)
    other.setup("fit")
    assert not np.array_equal(_stream(other.val_dataset), streams[0][1])


def test_second_setup_reuses_the_cache(corpus, tmp_path: Path, monkeypatch) -> None:
    root, _ = corpus
    first = _dm(tmp_path, root)
    first.prepare_data()
    first.setup("fit")
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    names = sorted(p.relative_to(next((tmp_path / "cache" / "prepared").iterdir())).as_posix() for p in cached)
    assert names == [".lock", "index.json", "tokenizer.json", "train/000000.bin", "val/000000.bin"]
    assert not [p for p in (tmp_path / "cache").rglob("*tmp*")]

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(prepare_module, "train_tokenizer", fail)
    monkeypatch.setattr(prepare_module, "tokenize_unit", fail)
    start = time.perf_counter()
    # Another window length and worker count read the same token cache.
    second = _dm(tmp_path, root, seq_len=32, num_workers=1)
    second.prepare_data()
    second.setup("fit")
    assert time.perf_counter() - start < 2
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()} == cached
    assert tokenizer_fingerprint(second.tokenizer) == tokenizer_fingerprint(first.tokenizer)
    assert len(second.train_dataset) < len(first.train_dataset)

    # Touching a source file invalidates the entry.
    (root / "doc000.txt").write_text("changed\n" * 50)
    monkeypatch.undo()
    third = _dm(tmp_path, root)
    third.setup("fit")
    assert len([p for p in (tmp_path / "cache" / "prepared").iterdir()]) == 2


def test_killed_tokenization_leaves_no_cache_entry(corpus, tmp_path: Path, monkeypatch) -> None:
    root, _ = corpus

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "tokenize_unit", killed)
    with pytest.raises(KeyboardInterrupt):
        _dm(tmp_path, root).prepare_data()
    assert list((tmp_path / "cache" / "prepared").glob("*/index.json")) == []  # unfinished: no index
    monkeypatch.undo()
    dm = _dm(tmp_path, root)
    dm.setup("fit")  # setup builds the cache itself when prepare_data did not
    assert len(dm.train_dataset) > 0


def test_default_cache_dir_honours_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSV3_CACHE", str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    monkeypatch.delenv("DSV3_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "dsv3_lightning"


# ------------------------------------------------------------------------------ input formats


def test_jsonl_input(tmp_path: Path) -> None:
    rng = random.Random(1)
    texts = [_text(rng, 60) for _ in range(30)]
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": i, "text": t}) + "\n" + ("\n" if i % 7 == 0 else "")
            for i, t in enumerate(texts)
        )
    )
    dm = _dm(tmp_path, path)
    dm.setup("fit")
    docs = _documents(dm, dm.train_dataset) + _documents(dm, dm.val_dataset)
    assert sorted(docs) == sorted(texts)


def test_directory_input_is_recursive_and_filtered(tmp_path: Path) -> None:
    rng = random.Random(2)
    root = tmp_path / "corpus"
    expected = {}
    for rel in ["a.txt", "sub/b.md", "sub/deeper/c.py", "d.txt"]:
        expected[rel] = _text(rng, 300)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(expected[rel])
    records = [_text(rng, 100) for _ in range(3)]
    (root / "sub" / "e.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    for ignored in ["notes.csv", ".hidden.txt", ".git/HEAD.txt"]:
        (root / ignored).parent.mkdir(parents=True, exist_ok=True)
        (root / ignored).write_text("IGNORED " * 100)
    dm = _dm(tmp_path, root, val_fraction=0.3)
    dm.setup("fit")
    docs = _documents(dm, dm.train_dataset) + _documents(dm, dm.val_dataset)
    assert sorted(docs) == sorted([*expected.values(), *records])


def test_single_text_file_splits_head_and_tail(tmp_path: Path) -> None:
    text = _text(random.Random(3), 3000)
    (tmp_path / "one.txt").write_text(text)
    dm = _dm(tmp_path, tmp_path / "one.txt", val_fraction=0.1)
    dm.setup("fit")
    (head,), (tail,) = _documents(dm, dm.train_dataset), _documents(dm, dm.val_dataset)
    assert head + tail == text and head.endswith("\n")
    assert abs(len(tail) / len(text) - 0.1) < 0.02


def test_default_corpus_is_the_standard_library(tmp_path: Path, caplog) -> None:
    dm = _dm(tmp_path, None, vocab_size=512, seq_len=64, max_corpus_bytes=2_000_000, val_fraction=0.05)
    with caplog.at_level(logging.INFO, logger="dsv3_lightning"):  # the corpus's budget, the data's cache
        dm.prepare_data()
        dm.setup("fit")
    assert caplog.text.count("data.max_corpus_bytes (2000000) keeps") == 1
    assert "prepare: " in caplog.text and "prepared " in caplog.text
    assert dm.tokenizer.get_vocab_size() == 512
    assert len(dm.train_dataset) > 1000 and len(dm.val_dataset) > 10
    decoded = dm.tokenizer.decode(dm.train_dataset.store.read(0, 20_000).tolist())
    assert "def " in decoded and "import " in decoded
    assert dm.unigram_loss() < math.log(512)


# ---------------------------------------------------------------------------------- baseline


def test_unigram_loss_matches_direct_computation(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    root.mkdir()
    texts = {"a.txt": "abracadabra " * 20, "b.txt": "banana bandana " * 15, "c.txt": "cabbage cab " * 25}
    for name, text in texts.items():
        (root / name).write_text(text)
    # A seed that holds out exactly one of the three documents.
    seed = next(s for s in range(100) if sum(document_key(s, n, 0) < 0.3 for n in texts) == 1)
    dm = _dm(tmp_path, root, vocab_size=258, seq_len=8, val_fraction=0.3, seed=seed)  # 258: bytes only
    dm.setup("fit")
    tok, eos = dm.tokenizer, dm.eos_token_id
    (val_doc,) = _documents(dm, dm.val_dataset)
    train_stream = [
        t for name in sorted(texts) if texts[name] != val_doc for t in tok.encode(texts[name]).ids + [eos]
    ]
    val_stream = tok.encode(val_doc).ids + [eos]
    assert len(train_stream) == dm.train_dataset.num_tokens and len(val_stream) == dm.val_dataset.num_tokens
    num_windows = (len(val_stream) - 9) // 8 + 1
    targets = val_stream[1 : num_windows * 8 + 1]
    counts = Counter(train_stream)
    expected = -sum(math.log((counts[t] + 1) / (len(train_stream) + 258)) for t in targets) / len(targets)
    assert dm.unigram_loss() == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------ errors


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"data\.seq_len \(0\) must be >= 1"):
        DSV3DataModule(seq_len=0)
    with pytest.raises(ValueError, match=r"data\.extra_tokens \(-1\) must be >= 0"):
        DSV3DataModule(extra_tokens=-1)
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"data\.val_fraction \({fraction}\) must be in \(0, 1\)"):
            DSV3DataModule(val_fraction=fraction)
    with pytest.raises(ValueError, match=r"data\.max_corpus_bytes \(0\) must be positive"):
        DSV3DataModule(max_corpus_bytes=0)


def test_data_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.data_path \('.*missing'\) does not exist"):
        _dm(tmp_path, tmp_path / "missing").prepare_data()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data\.data_path \('.*empty'\) holds no \*\.txt"):
        _dm(tmp_path, tmp_path / "empty").prepare_data()
    (tmp_path / "blank").mkdir()
    for i in range(3):
        (tmp_path / "blank" / f"{i}.txt").write_text("")
    with pytest.raises(ValueError, match=r"data\.data_path \('.*blank'\) holds no text"):
        _dm(tmp_path, tmp_path / "blank").prepare_data()
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(ValueError, match=r'x\.jsonl:2 has no "text" string \(found \[\'content\'\]\)'):
        _dm(tmp_path, tmp_path / "x.jsonl").prepare_data()
    (tmp_path / "y.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"y\.jsonl:2 is not valid JSON"):
        _dm(tmp_path, tmp_path / "y.jsonl").prepare_data()
    with pytest.raises(ValueError, match=r"data\.vocab_size \(100\) must be at least 258"):
        _dm(tmp_path, tmp_path / "x.jsonl", vocab_size=100).prepare_data()


def test_corpus_too_small(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    with pytest.raises(
        ValueError, match=r"validation tokens, fewer than one window of 100001 tokens \(data\.seq_len 100000"
    ):
        _dm(tmp_path, root, seq_len=100_000).setup("fit")
    with pytest.raises(
        ValueError, match=r"training windows of 33 tokens .* fewer than data\.batch_size \(10000\)"
    ):
        _dm(tmp_path, root, seq_len=32, batch_size=10_000).setup("fit")


def test_tokenizer_path(corpus, tmp_path: Path, monkeypatch) -> None:
    root, texts = corpus
    train_tokenizer(texts, vocab_size=400).save(str(tmp_path / "tok.json"))
    with pytest.raises(ValueError, match=r"data\.tokenizer_path \('.*tok\.json'\) has 400 tokens, more than "
                       r"data\.vocab_size \(300\)"):  # fmt: skip
        _dm(tmp_path, root, tokenizer_path=str(tmp_path / "tok.json")).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer_path \('.*other\.json'\) does not exist"):
        _dm(tmp_path, root, tokenizer_path=str(tmp_path / "other.json")).prepare_data()
    monkeypatch.setattr(prepare_module, "train_tokenizer", None)  # a given tokenizer is never retrained
    dm = _dm(tmp_path, root, tokenizer_path=str(tmp_path / "tok.json"), vocab_size=512)
    dm.setup("fit")
    assert dm.tokenizer.to_str() == load_tokenizer(tmp_path / "tok.json").to_str()


def test_tokenizer_needs_setup() -> None:
    with pytest.raises(RuntimeError, match="after prepare_data"):
        _ = DSV3DataModule().tokenizer
    with pytest.raises(RuntimeError, match="call setup"):
        DSV3DataModule().train_dataloader()


# ------------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    dm = _dm(tmp_path, root)
    dm.setup("fit")
    state = dm.state_dict()
    assert set(state) >= {"tokenizer_json"}
    fresh = _dm(tmp_path, root)
    fresh.load_state_dict(state)
    assert fresh.tokenizer.to_str() == dm.tokenizer.to_str()
    # A set-up DataModule with another tokenizer adopts the checkpoint's and re-tokenizes.
    other = _dm(tmp_path, root, vocab_size=320)
    other.setup("fit")
    assert other.tokenizer.to_str() != dm.tokenizer.to_str()
    other.load_state_dict(state)
    assert other.tokenizer.to_str() == dm.tokenizer.to_str()
    np.testing.assert_array_equal(_stream(other.train_dataset), _stream(dm.train_dataset))
    with pytest.raises(
        ValueError, match=r"checkpoint's tokenizer has 300 tokens, more than data\.vocab_size \(280\)"
    ):
        _dm(tmp_path, root, vocab_size=280).load_state_dict(state)


class _Bigram(L.LightningModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, vocab_size)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            self.emb(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()
        )

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_checkpoint_carries_the_tokenizer(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    kwargs = dict(
        max_steps=2, limit_val_batches=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    dm = _dm(tmp_path, root)
    trainer = L.Trainer(**kwargs)
    trainer.fit(_Bigram(dm.vocab_size), datamodule=dm)
    (ckpt_path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["DSV3DataModule"]["tokenizer_json"] == dm.tokenizer.to_str()
    resumed = _dm(tmp_path, root)
    L.Trainer(**{**kwargs, "max_steps": 3, "default_root_dir": tmp_path / "resume"}).fit(
        _Bigram(dm.vocab_size), datamodule=resumed, ckpt_path=ckpt_path
    )
    assert resumed.tokenizer.to_str() == dm.tokenizer.to_str()


def test_cli_parses_the_signature() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(DSV3DataModule, "data")
    cfg = parser.parse_args(["--data.seq_len=32", "--data.data_path=corpus.txt"])
    assert cfg.data.seq_len == 32 and cfg.data.data_path == "corpus.txt" and cfg.data.vocab_size == 4096
    assert "multi-token" in parser.format_help()
    cfg = parser.parse_args(["--data.mixture", '{"prepared/code": 0.3, "prepared/text": 0.7}'])
    assert cfg.data.mixture == {"prepared/code": 0.3, "prepared/text": 0.7} and cfg.data.data_path is None
