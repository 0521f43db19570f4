"""DSV3DataModule: a packed next-token corpus, tokenized once and memory-mapped afterwards.

Pipeline, run once per corpus and cached:

1. **Sources.** The text files of ``data.data_path`` (null: the Python standard library), within
   ``data.max_corpus_bytes``; files that are not text are skipped with a warning
   (:mod:`dsv3_lightning.corpus`: which files are read, the text check, the byte budget).
2. **Split.** A seeded, per-document split into training and validation, the same on every run
   (:func:`dsv3_lightning.corpus.split_documents`).
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

"files" are those the corpus keeps: a file the text check skips is no part of either key. Each
directory is written under a temporary name and published with one ``os.replace``, so a killed
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

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from dsv3_lightning.corpus import (
    SourceFile,
    describe_data_path,
    iter_documents,
    list_sources,
    split_documents,
)
from dsv3_lightning.sampling import ResumableShuffleSampler
from dsv3_lightning.tokenizer import (
    eos_token_id,
    load_tokenizer,
    tokenizer_fingerprint,
    tokenizer_from_str,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

# Bumped whenever the cached byte layout or the split changes, so stale entries are never read.
_CACHE_FORMAT = 1
# Characters handed to one encode_batch call: large enough to keep every core busy.
_ENCODE_BATCH_CHARS = 8_000_000


def default_cache_dir() -> Path:
    """``$DSV3_CACHE`` when set, else ``~/.cache/dsv3_lightning``."""
    return Path(os.environ.get("DSV3_CACHE") or Path.home() / ".cache" / "dsv3_lightning").expanduser()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:24]


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
        self._source_files: list[SourceFile] | None = None
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
        return describe_data_path(self.data_path)

    # ------------------------------------------------------------------------------- caching

    def _cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()

    def _sources(self) -> list[SourceFile]:
        if self._source_files is None:
            self._source_files = self._list_sources()
        return self._source_files

    def _list_sources(self) -> list[SourceFile]:
        return list_sources(self.data_path, self.max_corpus_bytes)

    @staticmethod
    def _signature(sources: list[SourceFile]) -> list[tuple[str, int, int]]:
        return [(str(f.path), f.size, f.mtime_ns) for f in sources]

    def _resolve_tokenizer(self, sources: list[SourceFile]) -> Tokenizer:
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
            tokenizer = train_tokenizer(iter_documents(sources), vocab_size=self.vocab_size)
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

    def _token_dir(self, sources: list[SourceFile], tokenizer: Tokenizer) -> Path:
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

    def _build_tokens(self, sources: list[SourceFile], tokenizer: Tokenizer, out: Path) -> None:
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
        self, tmp: Path, sources: list[SourceFile], tokenizer: Tokenizer, num_bytes: int
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
            for document in itertools.chain(split_documents(sources, self.val_fraction, self.seed), [None]):
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
