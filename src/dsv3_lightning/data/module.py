"""DSV3DataModule: packed next-token windows streamed from prepared token stores.

What each Lightning hook does:

* ``prepare_data`` / ``setup``: each corpus of ``data.data_path`` (or of ``data.mixture``) is a
  prepared directory (``dsv3 prepare`` made it: ``index.json`` plus shards), opened and checked
  without reading the shards; or a raw corpus (files, or null for the standard library), prepared
  into ``data.cache_dir`` by the very same code (:mod:`~dsv3_lightning.data.prepare`) the first time,
  keyed by its files, split and tokenizer. On a cluster, prepare once beforehand: then no rank
  tokenizes anything, and ``setup`` costs a few file stats per shard.
* **Windows.** Sample ``i`` of a split is ``stream[i * seq_len : i * seq_len + window_len]`` with
  ``window_len = seq_len + 1 + extra_tokens`` (:class:`~dsv3_lightning.data.store.TokenWindows`):
  inputs ``window[:seq_len]``, next-token targets ``window[1:seq_len + 1]``, and the ``extra_tokens``
  that follow feed the multi-token prediction heads. Documents are packed back to back, each ended
  by ``<|eos|>``, as DeepSeek-V3 packs its pre-training sequences (no cross-document mask).
* ``train_dataloader``: :class:`~dsv3_lightning.data.sampling.GlobalOrderSampler` deals one global
  stream of windows, a function of ``data.seed`` alone, to the replicas the strategy names
  (``distributed_sampler_kwargs``: every process under DDP or expert parallelism, one replica per copy
  of the pipeline under a pipeline strategy). Memory per rank does not grow with the corpus.
* ``state_dict``: the tokenizer and the stream position (windows consumed by the whole job). A run
  resumed on any mesh, any number of replicas or batch size continues with the next unseen window.
* **Mixtures.** ``data.mixture: {path: weight, ...}`` mixes corpora (prepared or raw) into the one
  stream, each block of 4,096 windows holding each corpus's share, deterministically; validation is
  every corpus's validation split in turn. All must share one tokenizer.
* **Conversations.** ``data.conversations`` (:mod:`~dsv3_lightning.data.conversations`) fine-tunes on
  conversations instead: read in ``setup``, rendered with a chat template, tokenized with
  ``data.tokenizer_path`` (or the checkpoint's tokenizer) and packed into windows held in memory; a
  sample is then a dict of ``tokens``, ``loss_mask`` and ``documents``. The training order, its
  resume and validation are the same as above, over these windows. The tokenizer and the chat
  template may come from a checkpoint, which Lightning restores after ``setup``: when neither
  ``data.tokenizer_path`` nor a template is there yet, tokenizing waits for the dataloaders.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from typing_extensions import override

from dsv3_lightning.data.chat import ChatTemplate, choose_template, tokenizer_directory
from dsv3_lightning.data.conversations import Conversation, Conversations, conversation_windows, read_splits
from dsv3_lightning.data.prepare import PrepareSettings, prepare_corpus, signature, signature_key
from dsv3_lightning.data.sampling import CorpusOrder, EvaluationSampler, GlobalOrderSampler, MixtureOrder
from dsv3_lightning.data.sources import SourceFile, describe_data_path, list_sources
from dsv3_lightning.data.store import PreparedCorpus, TokenWindows, is_prepared, open_prepared
from dsv3_lightning.tokenizer import eos_token_id, load_tokenizer, tokenizer_fingerprint, tokenizer_from_str

logger = logging.getLogger(__name__)

_POSITION_FORMAT = 2


def default_cache_dir() -> Path:
    """``$DSV3_CACHE`` when set, else ``~/.cache/dsv3_lightning``."""
    return Path(os.environ.get("DSV3_CACHE") or Path.home() / ".cache" / "dsv3_lightning").expanduser()


def data_replicas(trainer: L.Trainer | None) -> tuple[int, int]:
    """(replicas, this process's replica) of the training data: the strategy's
    ``distributed_sampler_kwargs``, or (1, 0) without a trainer or on one device."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return 1, 0
    return kwargs["num_replicas"], kwargs["rank"]


class ResumableLoader(DataLoader):
    """The training DataLoader, marked resumable for Lightning.

    The stream position lives in the data module's checkpoint state (``state_dict`` below), so these
    two methods carry nothing; their presence tells Lightning that a mid-epoch resume continues where
    it stopped (it warns about "not resumable" dataloaders otherwise).
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class DSV3DataModule(L.LightningDataModule):
    """Packed next-token windows from prepared token shards (see the module docstring).

    Args:
        data_path: A directory made by ``dsv3 prepare`` (it holds ``index.json``); or a raw corpus,
            prepared into ``cache_dir`` on first use: a text file, a ``.jsonl`` file of ``{"text": ...}``
            records, a ``.parquet`` file with a ``text`` column, or a directory searched recursively for
            ``*.txt``, ``*.md``, ``*.py``, ``*.jsonl`` and ``*.parquet`` files. Null trains on the
            ``*.py`` files of the running Python's standard library.
        mixture: Several corpora (prepared directories or raw corpora, as ``data_path``) mixed by
            weight, e.g. ``{"prepared/code": 0.3, "prepared/text": 0.7}``; leave ``data_path`` null.
        tokenizer_path: A ``tokenizer.json`` (or a Hugging Face checkpoint directory holding one) to
            tokenize raw corpora with instead of training a byte-level BPE on them; it must define
            ``<|eos|>``. A prepared corpus carries its own and must match it.
        vocab_size: The vocabulary the model's embedding and output head are built with, and the
            size of the BPE trained on a raw corpus; a tokenizer may be smaller, never larger.
        seq_len: Model context length: tokens per training sequence.
        extra_tokens: Tokens each window carries beyond ``seq_len + 1`` for the multi-token
            prediction heads; depth D needs D.
        batch_size: Windows per batch (per data-parallel replica).
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of a raw corpus's documents held out for validation, in (0, 1).
        seed: Seed of the training order (and of a raw corpus's document split).
        cache_dir: Where raw corpora are prepared; null uses ``$DSV3_CACHE`` or ``~/.cache/dsv3_lightning``.
        max_corpus_bytes: Keep whole files of a raw corpus up to this many bytes, chosen by a hash of
            their paths; null keeps everything.
        prepare_workers: Processes that tokenize a raw corpus (``dsv3 prepare --workers``).
        conversations: Fine-tune on conversations instead of pretraining windows: their files, chat
            template, packing, overflow and loss (``dsv3_lightning.data.conversations``). Leave
            ``data_path`` and ``mixture`` null; ``tokenizer_path`` names the tokenizer.
    """

    def __init__(
        self,
        *,
        data_path: str | None = None,
        mixture: dict[str, float] | None = None,
        tokenizer_path: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        extra_tokens: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        seed: int = 1234,
        cache_dir: str | None = None,
        max_corpus_bytes: int | None = None,
        prepare_workers: int = 1,
        conversations: Conversations | None = None,
    ) -> None:
        super().__init__()
        for key, value, minimum, meaning in (
            ("seq_len", seq_len, 1, "the model's context length, e.g. 256"),
            ("vocab_size", vocab_size, 1, "the tokenizer and embedding size, e.g. 4096"),
            ("extra_tokens", extra_tokens, 0, "0, or the multi-token prediction depth D"),
            ("batch_size", batch_size, 1, "windows per batch, e.g. 8"),
            ("num_workers", num_workers, 0, "0 to load in the main process"),
            ("prepare_workers", prepare_workers, 1, "the processes that tokenize a raw corpus, e.g. 4"),
        ):
            if value < minimum:
                raise ValueError(f"data.{key} ({value}) must be >= {minimum}: set it to {meaning}.")
        if max_corpus_bytes is not None and max_corpus_bytes < 1:
            raise ValueError(
                f"data.max_corpus_bytes ({max_corpus_bytes}) must be positive, or null to keep every file"
            )
        self._settings = PrepareSettings(  # validates val_fraction
            data_path=data_path, max_corpus_bytes=max_corpus_bytes, val_fraction=val_fraction, seed=seed,
            vocab_size=vocab_size,
        )  # fmt: skip
        self.corpora, self.weights = self._corpora(data_path, mixture)
        if isinstance(conversations, dict):
            conversations = Conversations(**conversations)
        if conversations is not None and (data_path is not None or mixture is not None):
            key, value = ("data_path", data_path) if data_path is not None else ("mixture", mixture)
            raise ValueError(
                f"data.conversations is set, and so is data.{key} ({value!r}): the conversations are the "
                f"training data. Set data.{key} to null, or data.conversations to null to pretrain."
            )
        self.conversations = conversations
        self.data_path = data_path
        self.mixture = mixture
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
        self.prepare_workers = prepare_workers
        self._checkpoint_tokenizer: Tokenizer | None = None
        self._tokenizer: Tokenizer | None = None
        self._prepared: list[PreparedCorpus] | None = None
        self._train: list[TokenWindows] | None = None
        self._val: list[TokenWindows] | None = None
        self._sampler: GlobalOrderSampler | None = None
        self._resume_position: dict[str, Any] | None = None
        self._listed: dict[str | None, list[SourceFile]] = {}
        self._splits: tuple[list[Conversation], list[Conversation]] | None = None
        self._chat: ChatTemplate | None = None
        self._checkpoint_chat: ChatTemplate | None = None

    @staticmethod
    def _corpora(data_path: str | None, mixture: dict[str, float] | None) -> tuple[list[str | None], list[float]]:
        if mixture is None:
            return [data_path], [1.0]
        if data_path is not None:
            raise ValueError(
                f"data.data_path ({data_path!r}) and data.mixture are both set: list every corpus in "
                "data.mixture (with its weight) and leave data.data_path null."
            )
        if not mixture:
            raise ValueError("data.mixture is empty: give at least one {path: weight}, or set it to null.")
        for path, weight in mixture.items():
            if not weight >= 0:
                raise ValueError(
                    f"data.mixture[{path!r}] is {weight}: a weight must be >= 0 (a share of the training stream)."
                )
        if sum(mixture.values()) <= 0:
            raise ValueError(f"data.mixture's weights {list(mixture.values())} sum to 0: give some corpus a positive weight.")
        return list(mixture), [float(w) for w in mixture.values()]

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
    def prepared(self) -> list[PreparedCorpus]:
        """The opened token stores, one per corpus (after ``setup``)."""
        if self.conversations is not None:
            raise RuntimeError("DSV3DataModule.prepared: data.conversations is set, so there are no token stores")
        if self._prepared is None:
            raise RuntimeError("DSV3DataModule: call setup() before asking for datasets or dataloaders")
        return self._prepared

    @property
    def train_dataset(self) -> Dataset:
        self._tokenize_conversations()
        return self._dataset(self._train)

    @property
    def val_dataset(self) -> Dataset:
        self._tokenize_conversations()
        return self._dataset(self._val)

    @property
    def chat_template(self) -> ChatTemplate:
        """The chat template conversations are rendered with (after ``setup`` with ``data.conversations``)."""
        self._tokenize_conversations()
        if self._chat is None:
            raise RuntimeError("DSV3DataModule.chat_template: set data.conversations and call setup() first")
        return self._chat

    @staticmethod
    def _dataset(parts: list[TokenWindows] | None) -> Dataset:
        if parts is None:
            raise RuntimeError("DSV3DataModule: call setup() before asking for datasets or dataloaders")
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    # ----------------------------------------------------------------------------- preparing

    def _cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()

    def _given_tokenizer(self) -> tuple[Tokenizer | None, str]:
        if self._checkpoint_tokenizer is not None:
            return self._checkpoint_tokenizer, "the checkpoint's tokenizer"
        if self.tokenizer_path is not None:
            path = Path(self.tokenizer_path).expanduser()
            if path.is_dir():
                path = path / "tokenizer.json"
            # <|eos|> separates pretraining documents; conversations end with their template's own
            tokenizer = load_tokenizer(path, require_eos=self.conversations is None)
            return tokenizer, f"data.tokenizer_path ({self.tokenizer_path!r})"
        return None, ""

    def _sources(self, data_path: str | None) -> list[SourceFile]:
        """A raw corpus's files, listed (and warned about) once per data module."""
        if data_path not in self._listed:
            self._listed[data_path] = list_sources(data_path, self.max_corpus_bytes)
        return self._listed[data_path]

    def _open(self, data_path: str | None, given: Tokenizer | None) -> PreparedCorpus:
        """A corpus's token store: opened when prepared, else prepared into the cache first."""
        if data_path is not None and is_prepared(data_path):
            return open_prepared(data_path)
        settings = dataclasses.replace(self._settings, data_path=data_path)
        sources = self._sources(data_path)
        key = signature_key(signature(settings, sources, given))
        output = self._cache_root() / "prepared" / key
        if not is_prepared(output):
            if self.trainer is not None and self.trainer.world_size > 1:
                logger.warning(
                    "%s is a raw corpus: preparing it now in %s. On many ranks prepare it once beforehand "
                    "(`dsv3 prepare %s --output DIR`) and set data.data_path to DIR.",
                    describe_data_path(data_path), output, data_path or "",
                )  # fmt: skip
            prepare_corpus(settings, output, workers=self.prepare_workers, tokenizer=given, sources=sources)
        return open_prepared(output)

    def _check_vocabulary(self, source: str, size: int, fix: str) -> None:
        """Refuse a tokenizer with more ids than the model's embedding (``data.vocab_size``)."""
        if size > self.vocab_size:
            raise ValueError(
                f"{source} has {size} tokens, more than data.vocab_size ({self.vocab_size}), the size of the "
                f"model's embedding. {fix}"
            )

    def _prepare(self) -> list[PreparedCorpus]:
        given, source = self._given_tokenizer()
        if given is not None:
            size = given.get_vocab_size()
            self._check_vocabulary(source, size, f"Raise data.vocab_size to at least {size}, or use a smaller tokenizer.")
        prepared = [self._open(path, given) for path in self.corpora]
        first = prepared[0]
        for other in prepared[1:]:
            if other.index["tokenizer"]["fingerprint"] != first.index["tokenizer"]["fingerprint"]:
                raise ValueError(
                    f"data.mixture: {other.path} and {first.path} were prepared with different tokenizers. "
                    "Prepare every corpus of a mixture with one tokenizer (`dsv3 prepare --tokenizer`)."
                )
        fingerprint = tokenizer_fingerprint(first.tokenizer)
        if given is not None and tokenizer_fingerprint(given) != fingerprint:
            fix = "drop data.tokenizer_path" if self._checkpoint_tokenizer is None else "resume from another checkpoint"
            raise ValueError(
                f"{first.path} was prepared with another tokenizer than {source}. Prepare it again with that "
                f"tokenizer (`dsv3 prepare ... --tokenizer <tokenizer.json>`), or {fix}."
            )
        self._check_vocabulary(
            str(first.path / "tokenizer.json"), first.vocab_size,
            f"Raise data.vocab_size to at least {first.vocab_size}, or use a corpus prepared with a smaller tokenizer.",
        )  # fmt: skip
        eos_token_id(first.tokenizer, source=str(first.path / "tokenizer.json"))
        return prepared

    # ------------------------------------------------------------------------ Lightning hooks

    @override
    def prepare_data(self) -> None:
        if self.conversations is not None:
            self._read_conversations()  # generates the default set once per node
            self._tokenizer = self._given_tokenizer()[0] or self._tokenizer
            return
        self._tokenizer = self._prepare()[0].tokenizer

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        if self.conversations is not None:
            self._read_conversations()
            self._tokenize_conversations(final=False)
            return
        prepared = self._prepare()
        train, val = (
            [
                TokenWindows(p.splits[split], window_len=self.window_len, stride=self.seq_len)
                for p in prepared
            ]
            for split in ("train", "val")
        )
        window = f"{self.window_len} tokens (data.seq_len {self.seq_len} + 1 + data.extra_tokens "
        window += f"{self.extra_tokens})"
        for p, t, v in zip(prepared, train, val, strict=True):
            where = f"{p.path} ({p.index['source']['data_path']})"
            if len(v) < 1:
                raise ValueError(
                    f"{where} gives {v.num_tokens} validation tokens, fewer than one window of {window}. Lower "
                    f"data.seq_len, raise data.val_fraction ({self.val_fraction}) or add text."
                )
            if len(t) < 1:
                raise ValueError(
                    f"{where} gives {t.num_tokens} training tokens, fewer than one window of {window}. Lower "
                    "data.seq_len or add text."
                )
        total = sum(len(t) for t in train)
        if total < self.batch_size:
            raise ValueError(
                f"{describe_data_path(self.data_path) if self.mixture is None else 'data.mixture'} gives "
                f"{total} training windows of {window}, fewer than data.batch_size ({self.batch_size}). Lower "
                "data.seq_len or data.batch_size, or add text."
            )
        logger.info(
            "data: %d train and %d validation windows of %d tokens from %s",
            total, sum(len(v) for v in val), self.window_len, ", ".join(str(p.path) for p in prepared),
        )  # fmt: skip
        self._prepared, self._train, self._val = prepared, train, val
        self._tokenizer = prepared[0].tokenizer

    # ------------------------------------------------------------------------ conversations

    def _read_conversations(self) -> tuple[list[Conversation], list[Conversation]]:
        assert self.conversations is not None
        if self._splits is None:
            self._splits = read_splits(
                self.conversations, val_fraction=self.val_fraction, seed=self.seed, cache_root=self._cache_root()
            )  # fmt: skip
        return self._splits

    def _tokenize_conversations(self, *, final: bool = True) -> None:
        """Build the conversation windows once a tokenizer and a template are known (module docstring)."""
        if self.conversations is None or self._train is not None or self._splits is None:
            return
        tokenizer, source = self._given_tokenizer()
        if tokenizer is None:
            if not final:
                return
            raise ValueError(
                "data.conversations needs a tokenizer and data.tokenizer_path is null: set it to a "
                "tokenizer.json or a Hugging Face directory holding one (e.g. one written by `dsv3 convert`), "
                "or resume from a checkpoint that carries one."
            )
        size = tokenizer.get_vocab_size()
        self._check_vocabulary(source, size, f"Raise data.vocab_size to at least {size}, or use a smaller tokenizer.")
        chat = choose_template(
            self.conversations.chat_template, tokenizer_dir=tokenizer_directory(self.tokenizer_path),
            tokenizer=tokenizer, checkpoint=self._checkpoint_chat, required=final,
        )  # fmt: skip
        if chat is None:  # the checkpoint restored after setup may bring one
            return
        train, val = conversation_windows(
            *self._splits, settings=self.conversations, chat=chat, tokenizer=tokenizer, seq_len=self.seq_len,
            extra_tokens=self.extra_tokens, batch_size=self.batch_size, pad_id=chat.pad_id(tokenizer),
        )  # fmt: skip
        self._train, self._val, self._tokenizer, self._chat = [train], [val], tokenizer, chat

    # -------------------------------------------------------------------------------- order

    def step_counts(self, epoch: int, batch_idx: int, accumulation: int, num_batches: int) -> np.ndarray | None:
        """The global target counts of the optimizer step that training batch ``batch_idx`` of ``epoch``
        belongs to (conversations only, else None): [positions, targets at offsets 1 .. 1 + extra_tokens]
        summed over every replica's windows of the step's ``accumulation`` batches (fewer at the end of
        an epoch of ``num_batches``), read from the global order, so no collective is needed. With them
        each accumulated batch's loss is a share of the whole step's mean (batch.py)."""
        if self.conversations is None or self._sampler is None:
            return None
        table = self.train_dataset.target_counts
        first = batch_idx - batch_idx % accumulation
        positions = self._sampler.batch_positions(epoch, first, min(first + accumulation, num_batches) - first)
        return table[self._sampler.order(positions)].sum(axis=0)

    def _order(self) -> CorpusOrder | MixtureOrder:
        sizes = [len(t) for t in self._train or []]
        if len(sizes) == 1:
            return CorpusOrder(sizes[0], self.seed)
        return MixtureOrder(sizes, self.weights, self.seed)

    @override
    def train_dataloader(self) -> DataLoader:
        replicas, rank = data_replicas(self.trainer)
        dataset = self.train_dataset
        resume = None
        position = self._resume_position
        if position is not None:
            resume = self._resume_from(position)
            self._resume_position = None
        self._sampler = GlobalOrderSampler(
            self._order(), num_windows=len(dataset), num_replicas=replicas, rank=rank,
            batch_size=self.batch_size, resume=resume,
        )  # fmt: skip
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _resume_from(self, position: dict[str, Any]) -> tuple[int, int, int] | None:
        """``(epoch, samples_done, batches_done)`` for the sampler, from a checkpoint's position."""
        if position.get("format") != _POSITION_FORMAT:
            logger.warning(
                "the checkpoint predates the global training order (data position %s): the data order "
                "restarts from the beginning of the stream",
                position,
            )
            return None
        windows = [len(t) for t in self._train or []]
        if position["windows"] != windows:
            logger.warning(
                "the checkpoint's corpus had %s training windows, data.* now gives %s (another corpus, "
                "seq_len or extra_tokens): the order differs, so continuing at stream position %d of the new one",
                position["windows"], windows, position["samples_done"],
            )  # fmt: skip
        return position["epoch"], position["samples_done"], position["batches_done"]

    @override
    def val_dataloader(self) -> DataLoader:
        replicas, rank = data_replicas(self.trainer)
        dataset = self.val_dataset
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EvaluationSampler(len(dataset), num_replicas=replicas, rank=rank),
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
        if self._chat is not None:
            state.update(self._chat.checkpoint_state())
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit" and self._sampler is not None:
            # ``processed`` counts the batch whose end hooks are saving this checkpoint.
            epoch = trainer.current_epoch
            batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            state["position"] = {
                "format": _POSITION_FORMAT,
                "samples_done": self._sampler.samples_done(epoch, batches_done),
                "epoch": epoch,
                "batches_done": batches_done,
                "windows": [len(t) for t in self._train or []],
                "global_batch": self._sampler.global_batch,
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt the checkpoint's tokenizer, chat template and stream position.

        Lightning restores a datamodule after ``setup``. A raw corpus tokenized with another tokenizer
        than the checkpoint's is prepared again with the checkpoint's; a prepared corpus is refused.
        Conversations are tokenized again when the checkpoint's tokenizer differs, or its chat template
        does and ``data.conversations.chat_template`` is null.
        """
        self._resume_position = state_dict.get("position")
        changed, tokenizer = [], None
        if "tokenizer_json" in state_dict:
            tokenizer = tokenizer_from_str(
                state_dict["tokenizer_json"], source="the checkpoint's tokenizer", require_eos=self.conversations is None
            )  # fmt: skip
            self._check_vocabulary(
                "the checkpoint's tokenizer", tokenizer.get_vocab_size(),
                f"Set data.vocab_size to the checkpoint's ({state_dict.get('vocab_size')}).",
            )  # fmt: skip
            current = self._tokenizer
            if current is None or tokenizer_fingerprint(current) != tokenizer_fingerprint(tokenizer):
                self._checkpoint_tokenizer = tokenizer
                self._tokenizer = tokenizer
                changed.append("tokenizer")
        if self.conversations is not None:
            self._checkpoint_chat = ChatTemplate.from_checkpoint(state_dict, tokenizer)
            unset = self.conversations.chat_template is None
            chat, current = self._checkpoint_chat, self._chat
            if unset and chat is not None and current is not None and current.checkpoint_state() != chat.checkpoint_state():
                changed.append("chat template")
        if changed and self._train is not None:
            what = " and ".join(changed)
            if self.conversations is not None:
                logger.warning(
                    "the checkpoint's %s differs from the one of data.*: tokenizing the conversations again "
                    "with the checkpoint's. Set data.tokenizer_path / data.conversations.chat_template to it to "
                    "skip this.", what,
                )  # fmt: skip
            else:
                logger.warning(
                    "the checkpoint's tokenizer differs from the one of data.*: preparing the corpus again with "
                    "the checkpoint's. Set data.tokenizer_path to a saved copy of it to skip this."
                )
            self._train = self._val = self._prepared = None
            self.setup()

    # ------------------------------------------------------------------------------ baseline

    def unigram_loss(self) -> float:
        """Cross-entropy (nats/token) of an add-one unigram model on the validation targets.

        Token frequencies come from the whole train stream, smoothed over ``vocab_size`` (the model's
        output size); the targets are ``stream[1 : num_windows * seq_len + 1]`` of each validation
        split, the tokens the model is scored on. A trained model must beat this. With
        ``data.conversations``: frequencies of the training targets, scored on the validation targets
        (each conversation's first token is never a target).
        """
        if self.conversations is not None:
            train, val = self.train_dataset, self.val_dataset  # ConversationWindows
            counts = np.bincount(train.conversations.scored(), minlength=self.vocab_size)
            log_probs = np.log((counts + 1.0) / (counts.sum() + self.vocab_size))
            return float(-log_probs[val.conversations.scored()].mean())
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for p in self.prepared:
            for chunk in p.splits["train"].chunks():
                counts += np.bincount(chunk, minlength=self.vocab_size)
        log_probs = np.log((counts + 1.0) / (counts.sum() + self.vocab_size))
        targets = np.concatenate([v.store.read(1, len(v) * self.seq_len) for v in self._val or []])
        return float(-log_probs[targets].mean())


def windows_in_batch(batch: torch.Tensor | dict[str, torch.Tensor]) -> int:
    """Windows in a batch: ``ThroughputMonitor(batch_size_fn=...)`` for samples/s."""
    return (batch["tokens"] if isinstance(batch, dict) else batch).shape[0]


def targets_in_batch(batch: torch.Tensor | dict[str, torch.Tensor]) -> int:
    """Next-token targets in a batch (``ThroughputMonitor(length_fn=...)`` for tokens/s).

    Counts ``window_len - 1`` per window, which is exactly the trained positions when
    ``extra_tokens`` is 0 and overcounts by ``extra_tokens`` per window otherwise. A conversation
    batch counts its ``loss_mask`` (one reduction and, on a GPU, one device-to-host copy).
    """
    if isinstance(batch, dict):
        return int(batch["loss_mask"].sum())
    return batch.shape[0] * (batch.shape[1] - 1)
