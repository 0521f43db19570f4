"""Byte-level BPE tokenizer, trained on the corpus on first use.

The pipeline is GPT-2's, built with Hugging Face ``tokenizers``: the ByteLevel pre-tokenizer maps
every byte to a printable character and splits on GPT-2's regex (no prefix space is added, so
``decode(encode(text)) == text`` for any string), BPE merges are learned on top of the 256-byte
initial alphabet, and the ByteLevel decoder maps the bytes back. Nothing is ever unknown.

Two special tokens come first, so a trained tokenizer has fixed ids: ``<|bos|>`` = 0 and
``<|eos|>`` = 1. The data pipeline appends ``<|eos|>`` after every document; ``<|bos|>`` is reserved
and never emitted by ``encode`` (no post-processor is attached).

Differences from DeepSeek-V3: its tokenizer is a 128K-token byte-level BPE with a hand-written
pre-tokenizer for digits and CJK and the special token ``<｜end▁of▁sentence｜>``. Here the vocabulary
is trained on the user's corpus at a size a small model can afford (``data.vocab_size``). A
tokenizer file saved elsewhere may be loaded with :func:`load_tokenizer` as long as it defines
``<|eos|>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)
# The byte alphabet plus the special tokens: the smallest vocabulary BPE can start from.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _empty_byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(documents: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Learn byte-level BPE merges on ``documents`` until the vocabulary holds ``vocab_size`` tokens.

    A corpus too small to supply that many merges gives a smaller vocabulary; callers size their
    embeddings by ``vocab_size``, which then has unused rows.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"data.vocab_size ({vocab_size}) must be at least {MIN_VOCAB_SIZE}: a byte-level BPE "
            f"vocabulary holds the 256 bytes and the special tokens {', '.join(SPECIAL_TOKENS)} before "
            "any merge. Raise data.vocab_size (4096 is a good size for small models)."
        )
    tokenizer = _empty_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def tokenizer_from_str(text: str, *, source: str, require_eos: bool = True) -> Tokenizer:
    """Parse a serialized ``tokenizer.json``; ``source`` names where it came from in the error. It must
    define ``<|eos|>`` (pretraining's document separator) unless ``require_eos`` is false: fine-tuning
    and generation take a released tokenizer with its own special tokens."""
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise ValueError(
            f"{source} is not a valid Hugging Face tokenizer.json ({err}). Point data.tokenizer_path at "
            "a file written by tokenizers' Tokenizer.save(), or set it to null to train one on the corpus."
        ) from err
    if require_eos:
        eos_token_id(tokenizer, source=source)
    return tokenizer


def load_tokenizer(path: str | Path, *, require_eos: bool = True) -> Tokenizer:
    """Load a ``tokenizer.json`` named by ``data.tokenizer_path`` (``require_eos``: as ``tokenizer_from_str``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"data.tokenizer_path ({str(path)!r}) does not exist or is not a file. Point it at a "
            "tokenizer.json, or set it to null to train a tokenizer on the corpus."
        )
    source = f"data.tokenizer_path ({str(path)!r})"
    return tokenizer_from_str(path.read_text(encoding="utf-8"), source=source, require_eos=require_eos)


def eos_token_id(tokenizer: Tokenizer, *, source: str = "the tokenizer") -> int:
    """Id of ``<|eos|>``, the document separator; 1 in a tokenizer from :func:`train_tokenizer`."""
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(
            f"{source} has no {EOS_TOKEN} token, which separates packed documents. Add it as a special "
            "token, or set data.tokenizer_path to null to train a tokenizer that has it."
        )
    return token_id


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """SHA-256 of the serialized tokenizer: equal fingerprints encode every text identically."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
