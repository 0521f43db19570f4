"""Conversations: supervised fine-tuning data, read, checked, rendered with a chat template and packed.

``data.conversations`` (:class:`Conversations`) switches :class:`~dsv3_lightning.data.DSV3DataModule`
from pretraining windows to conversations:

* **Files.** ``path`` is a ``.jsonl`` file or a directory searched recursively for ``*.jsonl`` (hidden
  entries skipped, paths sorted); null generates questions about the standard library
  (:mod:`~dsv3_lightning.data.docstring_qa`). Each non-blank line is one conversation:
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``, or
  ``{"prompt": ..., "completion": ...}`` (strings: a user prompt and the assistant's completion; or, as
  TRL's conversational form, lists of messages: the prompt's then the completion's). A line that is
  not one of these, a message without string ``role`` and ``content``, another role, or a
  conversation without an assistant message is refused with its ``file:line`` and the fix.
* **Split.** ``val_path`` names the validation conversations; null holds out those whose
  :func:`~dsv3_lightning.data.sources.document_key` ``(data.seed, file, index in the file)`` falls
  below ``data.val_fraction``, as pretraining splits documents; a split left empty borrows the
  conversation whose key is nearest the threshold.
* **Tokens.** Each conversation is rendered with the chat template
  (:class:`~dsv3_lightning.data.chat.ChatTemplate`) as pieces, the assistant answers found by prefix
  rendering, and the pieces are tokenized one by one (no special tokens added) and concatenated, so
  the tokens of a prompt are those the model is given at generation time. With ``loss: assistant``
  the answers' tokens are the targets, with ``loss: all`` every token. Held in memory as three numpy
  arrays (int32 tokens, bool targets, int64 offsets per conversation): a few bytes a token.
* **Windows.** A conversation must fit in the first ``seq_len + 1`` positions of a window (so every
  target is scored by the main next-token loss); ``overflow: drop`` leaves out a longer one,
  ``truncate`` keeps its first ``seq_len + 1`` tokens (and drops it when no target is left).
  ``packing: true`` fills windows greedily in file order (next fit: a conversation that does not fit
  starts the next window; none is ever split), ``false`` puts one per window.

A window (:class:`ConversationWindows`) is a dict of three tensors of ``window_len`` (``seq_len + 1 +
extra_tokens``): ``tokens`` (int64), ``loss_mask`` (bool: the token is a training target, predicted
from the tokens before it) and ``documents`` (int64: the conversation's index in the window, 0, 1, ...,
-1 on padding). Padding, after the last conversation and on the positions from ``seq_len + 1`` on, is
the template's end-of-sequence token (``ChatTemplate.pad_id``: ``<|eos|>`` for this repository's
tokenizers) with no target and document -1. The model restarts positions at each document, keeps
attention within one and scores a target only when the predicting position is of the same document.

Not supported: tool calls and other message fields (only ``role`` and ``content`` reach the
template), conversations longer than a window split across windows, and streaming conversation
sets larger than memory.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from dsv3_lightning.data.chat import ChatTemplate
from dsv3_lightning.data.docstring_qa import generate_docstring_qa
from dsv3_lightning.data.sources import document_key

logger = logging.getLogger(__name__)

_KEY = "data.conversations"
ROLES = ("system", "user", "assistant")
_FORMS = '{"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}'
_ENCODE_BATCH = 4096  # conversations tokenized per encode_batch call


@dataclass(kw_only=True)
class Conversations:
    """Fine-tuning on conversations instead of pretraining windows (``data.conversations``)."""

    path: str | None = None
    """A ``.jsonl`` file of conversations, or a directory searched for ``*.jsonl``; null generates
    questions about the Python standard library answered by its docstrings."""
    val_path: str | None = None
    """Validation conversations (a file or directory, as ``path``); null holds out a
    ``data.val_fraction`` share of ``path``'s conversations."""
    chat_template: str | None = None
    """A built-in template (``dsv3_plain``, ``chatml``), a ``.jinja`` file or a Jinja template; null uses
    the tokenizer's own (``chat_template.jinja`` or ``tokenizer_config.json`` beside it)."""
    packing: bool = True
    """Pack several conversations into a window (never splitting one); false puts one per window."""
    overflow: Literal["drop", "truncate"] = "drop"
    """A conversation longer than ``seq_len + 1`` tokens is dropped, or truncated to its first
    ``seq_len + 1`` tokens."""
    loss: Literal["assistant", "all"] = "assistant"
    """Train on the assistant's answers only, or on every token of the conversation. Validation scores
    the answers in either case (``val/loss``), so that runs of both settings compare."""

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("overflow", self.overflow, ("drop", "truncate")),
            ("loss", self.loss, ("assistant", "all")),
        ):
            if value not in choices:
                raise ValueError(f"{_KEY}.{key} ({value!r}) must be one of {', '.join(choices)}.")


@dataclass(frozen=True)
class Conversation:
    """One conversation as read, with where it was read for messages and the split."""

    where: str
    """``"data.conversations.path: /data/chat.jsonl:12"``, prefixing errors about it."""
    name: str
    """Its file, relative to the root read (POSIX): what the split hashes."""
    index: int
    """Its index among its file's conversations."""
    messages: list[dict[str, str]]


# -------------------------------------------------------------------------------------- reading


def conversation_files(path: str, key: str) -> tuple[Path, list[Path]]:
    """The root (for stable names) and the ``.jsonl`` files of ``path``, sorted."""
    root = Path(path).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(
            f"{key} ({path!r}) does not exist. Point it at a .jsonl file of conversations or a directory of "
            f"them, or set {_KEY}.path to null to fine-tune on the standard library's docstrings."
        )
    if root.is_file():
        return root.parent, [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".jsonl") and not f.startswith(".")]
    if not files:
        raise ValueError(
            f"{key} ({path!r}) holds no *.jsonl files. Point it at a .jsonl file of conversations."
        )
    return root, sorted(files)


def _message(message: Any, i: int, where: str) -> dict[str, str]:
    if not (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    ):
        raise ValueError(
            f'{where}: message {i} ({json.dumps(message)[:80]}) has no string "role" and "content". Each '
            'message is {"role": "user", "content": "..."}.'
        )
    if message["role"] not in ROLES:
        raise ValueError(
            f"{where}: message {i} has the role {message['role']!r}; the accepted roles are {', '.join(ROLES)}. "
            "Rename it, or remove the message."
        )
    return {"role": message["role"], "content": message["content"]}


def _as_messages(value: Any, role: str, field: str, where: str) -> list[Any]:
    """A prompt or completion: a string (one message of ``role``) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise ValueError(
        f'{where}: "{field}" is a {type(value).__name__}; it must be a string or a list of messages. Write '
        f"each line as {_FORMS}."
    )


def parse_conversation(line: str, where: str) -> list[dict[str, str]]:
    """The messages of one ``.jsonl`` line, checked (module docstring)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where}: not valid JSON ({err}). Each line holds one conversation: {_FORMS}."
        ) from err
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError(
                f'{where}: "messages" is a {type(messages).__name__}, not a list. Write {_FORMS}.'
            )
    elif isinstance(record, dict) and "prompt" in record and "completion" in record:
        messages = _as_messages(record["prompt"], "user", "prompt", where)
        messages = messages + _as_messages(record["completion"], "assistant", "completion", where)
    else:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f'{where}: has neither "messages" nor "prompt" and "completion" (found {found}). Write each line '
            f"as {_FORMS}."
        )
    messages = [_message(m, i, where) for i, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            f"{where}: the conversation has no assistant message, so nothing to train on. Add the assistant's "
            "answer, or remove the line."
        )
    return messages


def read_conversations(path: str, key: str) -> list[Conversation]:
    """Every conversation of ``path`` (a file or directory), in path and line order; ``key`` is the
    YAML key that named it (``data.conversations.path`` or ``val_path``)."""
    root, files = conversation_files(path, key)
    conversations = []
    for file in files:
        name = file.relative_to(root).as_posix()
        with open(file, encoding="utf-8", errors="replace") as f:
            lines = ((n, line) for n, line in enumerate(f, start=1) if line.strip())
            for index, (lineno, line) in enumerate(lines):
                where = f"{key}: {file}:{lineno}"
                conversations.append(Conversation(where, name, index, parse_conversation(line, where)))
    if not conversations:
        raise ValueError(
            f"{key} ({path!r}) holds no conversations: its .jsonl files are empty. Write one conversation a "
            f"line: {_FORMS}."
        )
    return conversations


def split_conversations(
    conversations: list[Conversation], *, val_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) by each conversation's :func:`document_key`; neither left empty."""
    if len(conversations) < 2:
        raise ValueError(
            f"{_KEY}.path holds {len(conversations)} conversation, too few to hold out a data.val_fraction "
            f"({val_fraction}) share for validation. Add conversations, or set {_KEY}.val_path."
        )
    keys = np.array([document_key(seed, c.name, c.index) for c in conversations])
    is_val = keys < val_fraction
    if not is_val.any():
        is_val[np.argmin(keys)] = True
    elif is_val.all():
        is_val[np.argmax(keys)] = False
    train = [c for c, v in zip(conversations, is_val) if not v]
    return train, [c for c, v in zip(conversations, is_val) if v]


# ------------------------------------------------------------------------------------ tokenizing


@dataclass(frozen=True)
class TokenizedConversations:
    """Conversations as flat arrays: conversation ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray  # int32 [T]
    targets: np.ndarray  # bool [T]: a training target (loss_mask)
    offsets: np.ndarray  # int64 [N + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def trained(self, capacity: int) -> np.ndarray:
        """Per conversation, whether a target token after its first lies within its first ``capacity``
        (the first token of a conversation is never predicted: nothing of it comes before)."""
        counts = np.concatenate([[0], np.cumsum(self.targets, dtype=np.int64)])
        starts = self.offsets[:-1]
        ends = np.minimum(self.offsets[1:], starts + capacity)
        return counts[ends] - counts[np.minimum(starts + 1, ends)] > 0

    def scored(self) -> np.ndarray:
        """The target tokens a model is scored on: each conversation's first token is never predicted."""
        first = np.zeros(len(self.tokens), dtype=bool)
        first[self.offsets[:-1][self.lengths > 0]] = True
        return self.tokens[self.targets & ~first]

    def select(self, keep: np.ndarray, capacity: int) -> TokenizedConversations:
        """The conversations ``keep`` marks, each cut to its first ``capacity`` tokens."""
        lengths = self.lengths
        within = np.arange(len(self.tokens)) - np.repeat(self.offsets[:-1], lengths) < capacity
        index = np.repeat(keep, lengths) & within
        kept = np.minimum(lengths[keep], capacity)
        offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        return TokenizedConversations(self.tokens[index], self.targets[index], offsets)


def _pieces(
    conversations: list[Conversation], chat: ChatTemplate, loss: str
) -> Iterator[tuple[int, str, bool]]:
    """``(conversation, text, is_target)`` for every rendered piece."""
    for i, conversation in enumerate(conversations):
        for text, is_answer in chat.segments(conversation.messages, where=conversation.where + ": "):
            yield i, text, is_answer or loss == "all"


def tokenize_conversations(
    conversations: list[Conversation], chat: ChatTemplate, tokenizer: Tokenizer, *, loss: str
) -> TokenizedConversations:
    """Render and tokenize piece by piece (module docstring); no special tokens are added."""
    tokens, targets, lengths = [], [], np.zeros(len(conversations), dtype=np.int64)
    pieces = _pieces(conversations, chat, loss)
    while batch := list(itertools.islice(pieces, _ENCODE_BATCH)):
        encodings = tokenizer.encode_batch([text for _, text, _ in batch], add_special_tokens=False)
        for (i, _, is_target), encoding in zip(batch, encodings, strict=True):
            ids = np.asarray(encoding.ids, dtype=np.int32)
            tokens.append(ids)
            targets.append(np.full(len(ids), is_target))
            lengths[i] += len(ids)
    flat = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    mask = np.concatenate(targets) if targets else np.zeros(0, bool)
    return TokenizedConversations(flat, mask, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


# --------------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Fitted:
    """What :func:`fit_to_capacity` did to a split."""

    conversations: TokenizedConversations
    read: int
    longer: int  # longer than the capacity (dropped, or truncated)
    untrained: int  # dropped: no target token left (after truncation, or none to begin with)


def fit_to_capacity(tokenized: TokenizedConversations, capacity: int, overflow: str) -> Fitted:
    """Drop or truncate conversations longer than ``capacity``; drop those left without a target."""
    longer = tokenized.lengths > capacity
    trained = tokenized.trained(capacity)
    keep = trained & ~longer if overflow == "drop" else trained
    untrained = ~trained & ~longer if overflow == "drop" else ~trained
    return Fitted(tokenized.select(keep, capacity), len(tokenized), int(longer.sum()), int(untrained.sum()))


def pack(lengths: np.ndarray, capacity: int, packing: bool) -> np.ndarray:
    """Window bounds over conversations: window ``w`` holds conversations ``bounds[w]:bounds[w + 1]``.

    Next fit in order: a conversation that does not fit in what is left of the window starts the next.
    """
    if not packing or len(lengths) == 0:
        return np.arange(len(lengths) + 1, dtype=np.int64)
    bounds, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > capacity:
            bounds.append(i)
            used = 0
        used += n
    bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


class ConversationWindows(Dataset):
    """Windows of packed conversations: item ``i`` is ``{"tokens", "loss_mask", "documents"}`` (module
    docstring), each a tensor of ``window_len``.

    Args:
        conversations: The conversations, each at most ``capacity`` tokens.
        capacity: Positions a window gives its conversations: ``seq_len + 1``.
        window_len: ``seq_len + 1 + extra_tokens``.
        pad_id: The token of padding positions (``ChatTemplate.pad_id``).
        packing: Several conversations a window, or one.
    """

    def __init__(
        self,
        conversations: TokenizedConversations,
        *,
        capacity: int,
        window_len: int,
        pad_id: int,
        packing: bool,
    ) -> None:
        assert capacity <= window_len and (len(conversations) == 0 or conversations.lengths.max() <= capacity)
        self.conversations = conversations
        self.capacity = capacity
        self.window_len = window_len
        self.pad_id = pad_id
        self.packing = packing
        self.bounds = pack(conversations.lengths, capacity, packing)
        self.target_counts = self._target_counts(offsets=window_len - capacity + 1)
        """[windows, 1 + offsets] float64: each window's positions (``seq_len``), then its targets at
        offsets 1 .. 1 + extra_tokens as ``Batch.target_mask`` counts them (target token t of a
        conversation counts at offset k when t - k is a position of the same conversation): what
        ``DSV3DataModule.step_counts`` sums for every optimizer step."""

    def _target_counts(self, offsets: int) -> np.ndarray:
        c = self.conversations
        total = np.concatenate([[0], np.cumsum(c.targets, dtype=np.int64)])
        starts, ends = c.offsets[:-1], c.offsets[1:]
        per_conversation = np.stack(
            [total[ends] - total[np.minimum(starts + k, ends)] for k in range(1, offsets + 1)], axis=1
        )
        per_window = np.add.reduceat(per_conversation, self.bounds[:-1], axis=0) if len(self) else per_conversation
        positions = np.full((len(self), 1), self.capacity - 1)
        return np.concatenate([positions, per_window], axis=1).astype(np.float64)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        first, last = self.bounds[index], self.bounds[index + 1]
        start, end = self.conversations.offsets[first], self.conversations.offsets[last]
        n = end - start
        tokens = np.full(self.window_len, self.pad_id, dtype=np.int64)
        tokens[:n] = self.conversations.tokens[start:end]
        loss_mask = np.zeros(self.window_len, dtype=bool)
        loss_mask[:n] = self.conversations.targets[start:end]
        documents = np.full(self.window_len, -1, dtype=np.int64)
        documents[:n] = np.repeat(np.arange(last - first), self.conversations.lengths[first:last])
        return {
            "tokens": torch.from_numpy(tokens),
            "loss_mask": torch.from_numpy(loss_mask),
            "documents": torch.from_numpy(documents),
        }

    def describe(self) -> str:
        """``"310 windows (packing, 91.2% of positions are conversation tokens, 61.0% targets)"``."""
        positions = max(len(self) * self.capacity, 1)
        return (
            f"{len(self):,} windows ({'packing' if self.packing else 'one per window'}, "
            f"{len(self.conversations.tokens) / positions:.1%} of positions are conversation tokens, "
            f"{self.conversations.targets.sum() / positions:.1%} targets)"
        )


# ------------------------------------------------------------------------------ the data module's


def read_splits(
    settings: Conversations, *, val_fraction: float, seed: int, cache_root: Path
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) conversations of ``data.conversations`` (module docstring)."""
    path = settings.path
    if path is None:
        path = str(generate_docstring_qa(cache_root))
    train = read_conversations(path, f"{_KEY}.path")
    if settings.val_path is not None:
        return train, read_conversations(settings.val_path, f"{_KEY}.val_path")
    return split_conversations(train, val_fraction=val_fraction, seed=seed)


def conversation_windows(
    train: list[Conversation],
    val: list[Conversation],
    *,
    settings: Conversations,
    chat: ChatTemplate,
    tokenizer: Tokenizer,
    seq_len: int,
    extra_tokens: int,
    batch_size: int,
    pad_id: int,
) -> tuple[ConversationWindows, ConversationWindows]:
    """The training and validation windows, checked and logged in one line."""
    capacity = seq_len + 1
    fitted = []
    for split, conversations in (("training", train), ("validation", val)):
        loss = settings.loss if split == "training" else "assistant"  # validation: the answers, always
        tokenized = tokenize_conversations(conversations, chat, tokenizer, loss=loss)
        f = fit_to_capacity(tokenized, capacity, settings.overflow)
        if len(f.conversations) == 0:
            truncated = settings.overflow == "truncate"
            raise ValueError(
                f"{_KEY}: none of the {f.read:,} {split} conversations is left: {f.longer:,} are longer than "
                f"seq_len + 1 = {capacity} tokens ({_KEY}.overflow: {settings.overflow}) and {f.untrained:,} "
                f"have no target token{' left' if truncated else ''} ({_KEY}.loss: {settings.loss}). Raise "
                f"data.seq_len ({seq_len}), set {_KEY}.overflow to truncate, or give shorter conversations."
            )
        fitted.append(f)
    window_len = capacity + extra_tokens
    train_windows, val_windows = (
        ConversationWindows(
            f.conversations, capacity=capacity, window_len=window_len, pad_id=pad_id, packing=settings.packing
        )
        for f in fitted
    )
    if len(train_windows) < batch_size:
        raise ValueError(
            f"{_KEY}: the {len(train):,} training conversations make {len(train_windows):,} windows of "
            f"{capacity + extra_tokens} tokens, fewer than data.batch_size ({batch_size}). Lower "
            f"data.batch_size, set {_KEY}.packing to false (one conversation a window), or add conversations."
        )
    line = (
        f"data: {len(train):,} training conversations -> {train_windows.describe()}, {len(val):,} validation "
        f"-> {len(val_windows):,} windows"
    )
    longer = sum(f.longer for f in fitted)
    if longer:
        done = "dropped" if settings.overflow == "drop" else "truncated"
        line += f"; {longer:,} longer than seq_len + 1 = {capacity} tokens {done} ({_KEY}.overflow: {settings.overflow})"
    untrained = sum(f.untrained for f in fitted)
    if untrained:
        line += f"; {untrained:,} without a target token within seq_len + 1 tokens dropped"
    logger.info(line)
    return train_windows, val_windows
