"""Bad prepared corpora and data settings: each refused with the file or key, the value and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dsv3_lightning.data import DSV3DataModule, PrepareSettings, open_prepared, prepare_corpus
from dsv3_lightning.data.store import verify_checksums
from dsv3_lightning.tokenizer import train_tokenizer

from test_data import _write_corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    _write_corpus(root / "corpus", num_files=12, num_words=300)
    settings = PrepareSettings(data_path=str(root / "corpus"), vocab_size=300, val_fraction=0.2, shard_tokens=3000)
    prepare_corpus(settings, root / "prepared")
    return root / "prepared"


@pytest.fixture
def copy(prepared: Path, tmp_path: Path) -> Path:
    shutil.copytree(prepared, tmp_path / "p")
    return tmp_path / "p"


def _dm(path: Path, **kwargs) -> DSV3DataModule:
    return DSV3DataModule(data_path=str(path), **{"vocab_size": 300, "seq_len": 16, "batch_size": 2, **kwargs})


def test_a_truncated_shard_is_named(copy: Path) -> None:
    shard = copy / "train" / "000001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"shard .*train/000001\.bin is truncated: 5990 bytes, the index says 6000"):
        _dm(copy).setup("fit")


def test_a_missing_shard_and_an_index_that_does_not_add_up(copy: Path) -> None:
    (copy / "val" / "000000.bin").unlink()
    with pytest.raises(ValueError, match=r"shard .*val/000000\.bin listed in index\.json is missing"):
        open_prepared(copy)


def test_an_index_whose_totals_disagree_with_its_shards(copy: Path) -> None:
    index = json.loads((copy / "index.json").read_text())
    index["splits"]["train"]["tokens"] += 5
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"the train shards hold \d+ tokens, the index says \d+.*Prepare it again"):
        open_prepared(copy)


def test_a_corrupt_shard_is_found_by_verify_and_by_reading(copy: Path) -> None:
    shard = copy / "train" / "000000.bin"
    data = np.fromfile(shard, dtype=np.uint16)
    data[100] = 60_000  # an id no tokenizer of 300 tokens makes
    data.tofile(shard)
    corpus = open_prepared(copy)  # sizes are right: opening does not read the shards
    with pytest.raises(ValueError, match=r"train/000000\.bin is corrupt: its SHA-256 differs"):
        verify_checksums(corpus)
    with pytest.raises(ValueError, match=r"train/000000\.bin holds token id 60000, outside the tokenizer's 300 ids"):
        corpus.splits["train"].read(90, 20)


def test_a_tokenizer_that_is_not_the_index_s(copy: Path) -> None:
    train_tokenizer(["some other text entirely"] * 5, vocab_size=280).save(str(copy / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json is not the tokenizer the shards were made with"):
        open_prepared(copy)


def test_a_corpus_prepared_with_a_larger_vocabulary_than_the_model(prepared: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.json has 300 tokens, more than data\.vocab_size \(290\)"):
        _dm(prepared, vocab_size=290).setup("fit")


def test_a_tokenizer_path_unlike_the_prepared_corpus(prepared: Path, tmp_path: Path) -> None:
    train_tokenizer(["other words"] * 5, vocab_size=280).save(str(tmp_path / "tok.json"))
    with pytest.raises(ValueError, match=r"was prepared with another tokenizer than data\.tokenizer_path"):
        _dm(prepared, tokenizer_path=str(tmp_path / "tok.json")).setup("fit")


def test_an_index_of_another_format(copy: Path) -> None:
    (copy / "index.json").write_text(json.dumps({"format": "something/9"}))
    with pytest.raises(ValueError, match=r"index\.json is not a dsv3-tokens/1 index \(format 'something/9'\)"):
        open_prepared(copy)


def test_empty_corpus_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for i in range(3):
        (tmp_path / "empty" / f"{i}.md").write_text("")
    with pytest.raises(ValueError, match=r"data\.data_path \('.*empty'\) holds no text: every document is empty"):
        prepare_corpus(PrepareSettings(data_path=str(tmp_path / "empty"), vocab_size=300), tmp_path / "out")


@pytest.mark.parametrize(
    ("mixture", "data_path", "match"),
    [
        ({"a": 0.5, "b": -0.1}, None, r"data\.mixture\['b'\] is -0\.1: a weight must be >= 0"),
        ({"a": 0.0, "b": 0.0}, None, r"data\.mixture's weights \[0\.0, 0\.0\] sum to 0"),
        ({}, None, r"data\.mixture is empty"),
        ({"a": 1.0}, "corpus/", r"data\.data_path \('corpus/'\) and data\.mixture are both set"),
    ],
)
def test_mixture_errors(mixture, data_path, match) -> None:
    with pytest.raises(ValueError, match=match):
        DSV3DataModule(mixture=mixture, data_path=data_path)


def test_a_mixture_of_corpora_with_different_tokenizers(prepared: Path, tmp_path: Path) -> None:
    _write_corpus(tmp_path / "other", num_files=8, num_words=200, seed=5)
    prepare_corpus(PrepareSettings(data_path=str(tmp_path / "other"), vocab_size=290, val_fraction=0.2), tmp_path / "o")
    dm = DSV3DataModule(mixture={str(prepared): 1.0, str(tmp_path / "o"): 1.0}, vocab_size=300, seq_len=16)
    with pytest.raises(ValueError, match=r"data\.mixture: .* were prepared with different tokenizers"):
        dm.setup("fit")


def test_prepare_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"data\.prepare_workers \(0\) must be >= 1"):
        DSV3DataModule(prepare_workers=0)
