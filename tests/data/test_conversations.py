"""Contracts of the conversation (fine-tuning) mode: files, errors, masks, packing, overflow, the DataModule."""

from __future__ import annotations

import json
import logging
import shutil
import sysconfig
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from dsv3_lightning.data import (
    Conversations,
    DSV3DataModule,
    docstring_qa,
    targets_in_batch,
    windows_in_batch,
)
from dsv3_lightning.data.chat import BUILTIN_TEMPLATES, ChatTemplate
from dsv3_lightning.data.conversations import (
    ConversationWindows,
    fit_to_capacity,
    parse_conversation,
    read_conversations,
    split_conversations,
    tokenize_conversations,
)
from dsv3_lightning.data.docstring_qa import docstring_pairs, generate_docstring_qa, module_name
from dsv3_lightning.data.sources import document_key
from dsv3_lightning.tokenizer import EOS_TOKEN, train_tokenizer

PAIRS = [
    ("What does json.dumps do?", "Serialize obj to a JSON formatted str."),
    ("What does glob.glob do?", "Return a list of paths matching a pathname pattern."),
    ("What does shlex.split do?", "Split the string s using shell-like syntax."),
    ("What does bisect.insort do?", "Insert item x in list a, and keep it sorted."),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    texts = [f"User: {q}\n\nAssistant: {a}{EOS_TOKEN}\n\n" for q, a in PAIRS] * 10
    return train_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def tokenizer_path(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _qa(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _plain() -> ChatTemplate:
    return ChatTemplate(
        BUILTIN_TEMPLATES["dsv3_plain"], origin="dsv3_plain", bos_token="<|bos|>", eos_token=EOS_TOKEN
    )


def _windows(
    tokenizer, conversations, *, seq_len=64, extra=0, packing=True, loss="assistant", overflow="drop"
):
    tokenized = tokenize_conversations(conversations, _plain(), tokenizer, loss=loss)
    fitted = fit_to_capacity(tokenized, seq_len + 1, overflow)
    windows = ConversationWindows(
        fitted.conversations, capacity=seq_len + 1, window_len=seq_len + 1 + extra, pad_id=1, packing=packing
    )
    return fitted, windows


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(torch.as_tensor(ids).tolist(), skip_special_tokens=False)


# ----------------------------------------------------------------------------------------- files


def test_messages_and_prompt_completion_are_the_same_conversation() -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert parse_conversation(json.dumps({"messages": messages}), "w") == messages
    assert parse_conversation(json.dumps({"prompt": "q", "completion": "a"}), "w") == messages
    assert (
        parse_conversation(json.dumps({"prompt": messages[:1], "completion": messages[1:]}), "w") == messages
    )
    with_system = [{"role": "system", "content": "s"}, *messages]
    assert parse_conversation(json.dumps({"prompt": with_system[:2], "completion": "a"}), "w") == with_system


@pytest.mark.parametrize(
    "line, match",
    [
        (
            "{not json",
            r"f\.jsonl:2: not valid JSON \(.*\)\. Each line holds one conversation: \{\"messages\"",
        ),
        (
            '{"text": "x"}',
            r"f\.jsonl:2: has neither \"messages\" nor \"prompt\" and \"completion\" \(found \['text'\]\)",
        ),
        ('{"messages": "hi"}', r"\"messages\" is a str, not a list"),
        (
            '{"messages": [{"role": "user"}]}',
            r"f\.jsonl:2: message 0 \(\{\"role\": \"user\"\}\) has no string \"role\" and \"content\"",
        ),
        (
            '{"messages": [{"role": "tool", "content": "x"}]}',
            r"message 0 has the role 'tool'; the accepted roles are system, user, assistant",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}]}',
            r"f\.jsonl:2: the conversation has no assistant message, so nothing to train on",
        ),
        (
            '{"prompt": 3, "completion": "a"}',
            r"\"prompt\" is a int; it must be a string or a list of messages",
        ),
    ],
)
def test_bad_lines_are_refused_with_file_line_and_fix(tmp_path: Path, line: str, match: str) -> None:
    path = _write(tmp_path / "f.jsonl", [_qa("q", "a"), line])
    with pytest.raises(ValueError, match=match):
        read_conversations(str(path), "data.conversations.path")


def test_files_that_hold_no_conversations(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(
        ValueError, match=r"data\.conversations\.path \('.*empty\.jsonl'\) holds no conversations"
    ):
        read_conversations(str(tmp_path / "empty.jsonl"), "data.conversations.path")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match=r"data\.conversations\.val_path \('.*d'\) holds no \*\.jsonl files"):
        read_conversations(str(tmp_path / "d"), "data.conversations.val_path")
    with pytest.raises(FileNotFoundError, match=r"data\.conversations\.path \('.*nope'\) does not exist"):
        read_conversations(str(tmp_path / "nope"), "data.conversations.path")


def test_a_directory_is_read_in_path_order_and_split_per_conversation(tmp_path: Path) -> None:
    _write(tmp_path / "b.jsonl", [_qa(f"b{i}", "a") for i in range(30)])
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "a.jsonl", ["", _qa("a0", "a")])  # blank lines are skipped, not counted
    conversations = read_conversations(str(tmp_path), "data.conversations.path")
    assert [c.messages[0]["content"] for c in conversations] == [f"b{i}" for i in range(30)] + ["a0"]
    assert conversations[-1].name == "sub/a.jsonl" and conversations[-1].index == 0
    assert conversations[-1].where.endswith("a.jsonl:2")
    train, val = split_conversations(conversations, val_fraction=0.2, seed=7)
    assert {c.messages[0]["content"] for c in val} == {
        c.messages[0]["content"] for c in conversations if document_key(7, c.name, c.index) < 0.2
    }
    assert len(train) + len(val) == 31 and 0 < len(val) < 31
    few = conversations[:2]
    for fraction in (1e-9, 1 - 1e-9):  # a split left empty borrows a conversation
        assert [len(s) for s in split_conversations(few, val_fraction=fraction, seed=7)] == [1, 1]
    with pytest.raises(
        ValueError, match=r"holds 1 conversation, too few to hold out a data\.val_fraction \(0\.1\)"
    ):
        split_conversations(few[:1], val_fraction=0.1, seed=7)


def test_template_errors_name_the_line(tmp_path: Path, tokenizer) -> None:
    path = _write(tmp_path / "f.jsonl", [_qa("q", "a")])
    conversations = read_conversations(str(path), "data.conversations.path")
    failing = ChatTemplate("{{ raise_exception('no') }}", origin="t.jinja")
    with pytest.raises(ValueError, match=r"data\.conversations\.path: .*f\.jsonl:1: t\.jinja failed to render this "
                       r"conversation \(TemplateError: no\)"):  # fmt: skip
        tokenize_conversations(conversations, failing, tokenizer, loss="assistant")
    rewriting = ChatTemplate(
        "{{ messages | length }}{% if add_generation_prompt %}>{% endif %}", origin="t.jinja"
    )
    with pytest.raises(
        ValueError, match=r"f\.jsonl:1: t\.jinja does not render a conversation incrementally"
    ):
        tokenize_conversations(conversations, rewriting, tokenizer, loss="assistant")


# ------------------------------------------------------------------------------- masks, windows


def _conversations(tmp_path: Path, pairs=PAIRS, name="c.jsonl"):
    return read_conversations(
        str(_write(tmp_path / name, [_qa(q, a) for q, a in pairs])), "data.conversations.path"
    )


def test_the_assistant_mask_is_exactly_each_answer_and_its_end_of_turn(tmp_path: Path, tokenizer) -> None:
    system = {"role": "system", "content": "Be brief."}
    messages = [system, *_qa(*PAIRS[0])["messages"], *_qa(*PAIRS[1])["messages"]]
    path = _write(tmp_path / "m.jsonl", [{"messages": messages}])
    conversations = read_conversations(str(path), "data.conversations.path")
    _, windows = _windows(tokenizer, conversations, seq_len=128)
    item = windows[0]
    mask, tokens = item["loss_mask"], item["tokens"]
    # dsv3_plain: the answer is what follows the generation prompt "Assistant:" within the turn.
    assert _decode(tokenizer, tokens[mask]) == f" {PAIRS[0][1]}{EOS_TOKEN}\n\n {PAIRS[1][1]}{EOS_TOKEN}\n\n"
    rendered = _plain().render(messages, add_generation_prompt=False)
    n = int((item["documents"] == 0).sum())
    assert _decode(tokenizer, tokens[:n]) == rendered
    # Each answer is one contiguous run, starting right after a prompt that ends in "Assistant:".
    starts = torch.nonzero(mask[1:] & ~mask[:-1]).flatten() + 1
    assert len(starts) == 2 and all(
        _decode(tokenizer, tokens[:s]).endswith("Assistant:") for s in starts.tolist()
    )
    _, every = _windows(tokenizer, conversations, seq_len=128, loss="all")
    assert torch.equal(every[0]["loss_mask"], every[0]["documents"] >= 0) and every[0]["loss_mask"].sum() == n


def test_packing_fills_windows_in_order_and_pads_the_rest(tmp_path: Path, tokenizer) -> None:
    conversations = _conversations(tmp_path)
    lengths = tokenize_conversations(conversations, _plain(), tokenizer, loss="assistant").lengths
    seq_len = int(lengths[:3].sum()) - 1 + 2  # the first three fit with 2 positions to spare, not the fourth
    fitted, windows = _windows(tokenizer, conversations, seq_len=seq_len, extra=3)
    assert len(windows) == 2 and len(fitted.conversations) == 4
    item = windows[0]
    assert {k: (v.shape, v.dtype) for k, v in item.items()} == {
        "tokens": ((seq_len + 4,), torch.int64), "loss_mask": ((seq_len + 4,), torch.bool),
        "documents": ((seq_len + 4,), torch.int64),
    }  # fmt: skip
    expected = np.repeat([0, 1, 2, -1], [*lengths[:3], 2 + 3])
    np.testing.assert_array_equal(item["documents"].numpy(), expected)
    pad = item["documents"] == -1
    assert (item["tokens"][pad] == 1).all() and not item["loss_mask"][pad].any()
    assert (item["documents"][seq_len + 1 :] == -1).all()  # the MTP tail is padding
    second = windows[1]
    np.testing.assert_array_equal(second["documents"][: lengths[3]].numpy(), 0)
    assert _decode(tokenizer, second["tokens"][second["loss_mask"]]) == f" {PAIRS[3][1]}{EOS_TOKEN}\n\n"
    _, single = _windows(tokenizer, conversations, seq_len=seq_len, packing=False)
    assert len(single) == 4 and all(set(single[i]["documents"].tolist()) == {0, -1} for i in range(4))
    assert "(one per window, " in single.describe() and windows.describe().startswith("2 windows (packing, ")


def test_overflow_drops_or_truncates_and_counts(tmp_path: Path, tokenizer) -> None:
    long_answer = "Serialize obj to a JSON formatted str. " * 8
    conversations = _conversations(tmp_path, [*PAIRS[:2], ("What does json.dumps do?", long_answer)])
    lengths = tokenize_conversations(conversations, _plain(), tokenizer, loss="assistant").lengths
    seq_len = int(lengths[:2].max()) + 4
    fitted, windows = _windows(tokenizer, conversations, seq_len=seq_len, packing=False)
    assert (fitted.read, fitted.longer, fitted.untrained, len(windows)) == (3, 1, 0, 2)
    fitted, windows = _windows(tokenizer, conversations, seq_len=seq_len, packing=False, overflow="truncate")
    assert (fitted.read, fitted.longer, fitted.untrained, len(windows)) == (3, 1, 0, 3)
    cut = windows[2]
    assert (cut["documents"] == 0).all() and cut["loss_mask"].any()
    full = _plain().render(conversations[2].messages, add_generation_prompt=False)
    assert full.startswith(_decode(tokenizer, cut["tokens"])) and len(
        _decode(tokenizer, cut["tokens"])
    ) < len(full)
    # Truncated before its answer begins: no target left, so dropped too.
    prompt_only = len(
        tokenizer.encode(_plain().render(conversations[2].messages[:1], add_generation_prompt=True)).ids
    )
    fitted, windows = _windows(tokenizer, conversations[2:], seq_len=prompt_only - 1, overflow="truncate")
    assert (fitted.read, fitted.longer, fitted.untrained, len(fitted.conversations)) == (1, 1, 1, 0)


# -------------------------------------------------------------------------------- the DataModule


def _dm(tmp_path: Path, tokenizer_path, conversations: dict, **kwargs) -> DSV3DataModule:
    defaults = dict(
        vocab_size=320, seq_len=48, batch_size=2, val_fraction=0.2, cache_dir=str(tmp_path / "cache")
    )
    return DSV3DataModule(
        conversations=conversations, tokenizer_path=None if tokenizer_path is None else str(tokenizer_path),
        **{**defaults, **kwargs},
    )  # fmt: skip


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "chat.jsonl", [_qa(q + f" ({i})", a) for i in range(6) for q, a in PAIRS])


def test_the_data_module_gives_dict_batches(
    tmp_path: Path, tokenizer_path: Path, chat_file: Path, caplog
) -> None:
    dm = _dm(
        tmp_path, tokenizer_path, {"path": str(chat_file), "chat_template": "dsv3_plain"}, extra_tokens=1
    )
    assert isinstance(dm.conversations, Conversations)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
        dm.setup("fit")
    (line,) = [r.getMessage() for r in caplog.records if "training conversations" in r.getMessage()]
    assert line.startswith("data: ") and "-> " in line and "(packing, " in line and "% targets), " in line
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"tokens", "loss_mask", "documents"}
    assert [(v.shape, v.dtype) for v in batch.values()] == [
        (torch.Size([2, 50]), torch.int64), (torch.Size([2, 50]), torch.bool), (torch.Size([2, 50]), torch.int64),
    ]  # fmt: skip
    assert windows_in_batch(batch) == 2 and targets_in_batch(batch) == int(batch["loss_mask"].sum()) > 0
    val = next(iter(dm.val_dataloader()))
    assert val["tokens"].shape == (2, 50)
    state = dm.state_dict()
    assert state["chat_template"] == BUILTIN_TEMPLATES["dsv3_plain"] and "tokenizer_json" in state
    assert 0 < dm.unigram_loss() < np.log(320)
    # A fresh module with neither tokenizer nor template adopts the checkpoint's (restored after setup).
    fresh = _dm(tmp_path, None, {"path": str(chat_file)})
    fresh.setup("fit")
    fresh.load_state_dict(state)
    assert fresh.chat_template.origin == "the checkpoint's chat template"
    np.testing.assert_array_equal(fresh.train_dataset[0]["tokens"][:49], dm.train_dataset[0]["tokens"][:49])


def test_the_default_set_is_generated_into_the_cache(
    tmp_path: Path, tokenizer_path: Path, monkeypatch
) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path / "lib"
    root.mkdir()
    for name in ("glob.py", "shlex.py", "bisect.py", "colorsys.py"):
        shutil.copy(stdlib / name, root / name)
    monkeypatch.setattr(docstring_qa, "_list_corpus_files", lambda _: (root, sorted(root.glob("*.py"))))
    dm = _dm(tmp_path, tokenizer_path, {"chat_template": "dsv3_plain"}, seq_len=256, batch_size=1)
    dm.setup("fit")
    (generated,) = (tmp_path / "cache" / "conversations").glob("docstring_qa-*/docstring_qa.jsonl")
    questions = [json.loads(line)["messages"][0]["content"] for line in generated.read_text().splitlines()]
    assert "What does glob.glob do?" in questions and "What does shlex.split do?" in questions
    assert len(dm.train_dataset) + len(dm.val_dataset) >= 2


def test_data_module_errors(tmp_path: Path, tokenizer_path: Path, chat_file: Path) -> None:
    conversations = {"path": str(chat_file), "chat_template": "dsv3_plain"}
    with pytest.raises(
        ValueError,
        match=r"data\.conversations is set, and so is data\.data_path \('x'\).*Set data\.data_path to null",
    ):
        _dm(tmp_path, tokenizer_path, conversations, data_path="x")
    with pytest.raises(ValueError, match=r"data\.conversations is set, and so is data\.mixture"):
        _dm(tmp_path, tokenizer_path, conversations, mixture={"x": 1.0})
    with pytest.raises(
        ValueError, match=r"data\.conversations\.overflow \('cut'\) must be one of drop, truncate"
    ):
        Conversations(overflow="cut")
    with pytest.raises(
        ValueError, match=r"data\.conversations\.loss \('answers'\) must be one of assistant, all"
    ):
        Conversations(loss="answers")
    dm = _dm(tmp_path, None, conversations)
    dm.setup("fit")  # waits: a checkpoint may still bring the tokenizer
    with pytest.raises(ValueError, match=r"needs a tokenizer and data\.tokenizer_path is null: set it to a tokenizer\.json "
                       r"or a Hugging Face directory holding one \(e\.g\. one written by `dsv3 convert`\)"):  # fmt: skip
        dm.train_dataloader()
    with pytest.raises(
        ValueError, match=r"data\.tokenizer_path \(.*\) has \d+ tokens, more than data\.vocab_size \(300\)"
    ):
        _dm(tmp_path, tokenizer_path, conversations, vocab_size=300).setup("fit")
    with pytest.raises(ValueError, match=r"chat_template is null .* the tokenizer's directory .* has none"):
        _setup_and_load(_dm(tmp_path, tokenizer_path, {"path": str(chat_file)}))
    with pytest.raises(ValueError, match=r"none of the \d+ training conversations is left: \d+ are longer than seq_len \+ 1 = 9 "
                       r"tokens \(data\.conversations\.overflow: drop\)"):  # fmt: skip
        _dm(tmp_path, tokenizer_path, conversations, seq_len=8).setup("fit")
    with pytest.raises(
        ValueError, match=r"make \d+ windows of 49 tokens, fewer than data\.batch_size \(99\)"
    ):
        _dm(tmp_path, tokenizer_path, conversations, batch_size=99).setup("fit")


def _setup_and_load(dm: DSV3DataModule) -> None:
    dm.setup("fit")
    dm.train_dataloader()


def test_the_generator_is_deterministic(tmp_path: Path) -> None:
    assert (
        module_name(Path("json/__init__.py")) == "json"
        and module_name(Path("email/mime/text.py")) == "email.mime.text"
    )
    assert module_name(Path("_pyio.py")) is None and module_name(Path("json/__main__.py")) is None
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text(
        'def dumps(obj):\n    """Serialize   obj to a\n    JSON formatted str.\n\n    More detail."""\n'
        'def _private():\n    """A private function is never asked about."""\n'
        'class Short:\n    """Too short."""\n'
        'def dumps(x):\n    """A second definition of the same name is skipped."""\n'
    )
    (root / "mod.py").write_text(
        'class Encoder:\n    """Extensible JSON encoder for Python data structures."""\n'
    )
    (root / "broken.py").write_text("def f(:\n")
    files = sorted(root.rglob("*.py"))
    pairs = docstring_pairs(root, files, max_pairs=10, min_chars=20, max_chars=600)
    assert pairs == [
        ("What does mod.Encoder do?", "Extensible JSON encoder for Python data structures."),
        ("What does pkg.dumps do?", "Serialize obj to a JSON formatted str."),
    ]
    assert len(docstring_pairs(root, files, max_pairs=1, min_chars=20, max_chars=600)) == 1
    first = generate_docstring_qa(tmp_path / "cache", root=root, files=files)
    assert generate_docstring_qa(tmp_path / "cache", root=root, files=files) == first  # cached
    lines = [json.loads(line) for line in first.read_text().splitlines()]
    assert lines[0] == _qa(*pairs[0]) and len(lines) == 2
    assert (
        generate_docstring_qa(tmp_path / "cache", root=root, files=files, max_pairs=1) != first
    )  # keyed by settings
    assert not list((tmp_path / "cache").rglob(".*tmp*"))


def test_cli_parses_data_conversations() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(DSV3DataModule, "data")
    cfg = parser.parse_args(
        ["--data.conversations", '{"path": "chat.jsonl", "chat_template": "chatml", "packing": false}']
    )
    data = parser.instantiate(cfg).data
    assert data.conversations == Conversations(path="chat.jsonl", chat_template="chatml", packing=False)
    assert parser.parse_args([]).data.conversations is None


class _Bigram(L.LightningModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, vocab_size)

    def training_step(self, batch, batch_idx):
        logits = self.emb(batch["tokens"][:, :-1])
        mask = batch["loss_mask"][:, 1:] & (batch["documents"][:, 1:] == batch["documents"][:, :-1])
        return torch.nn.functional.cross_entropy(logits[mask], batch["tokens"][:, 1:][mask])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_checkpoint_carries_the_chat_template_and_resumes_without_one(
    tmp_path: Path, tokenizer_path: Path, chat_file: Path
) -> None:
    kwargs = dict(
        max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    dm = _dm(tmp_path, tokenizer_path, {"path": str(chat_file), "chat_template": "chatml"}, seq_len=128)
    L.Trainer(**kwargs).fit(_Bigram(320), datamodule=dm)
    (ckpt_path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt_path, weights_only=False)["DSV3DataModule"]
    assert state["chat_template"] == BUILTIN_TEMPLATES["chatml"] and state["position"]["samples_done"] == 4
    resumed = _dm(tmp_path, None, {"path": str(chat_file)}, seq_len=128)
    L.Trainer(**{**kwargs, "max_steps": 3, "default_root_dir": tmp_path / "r"}).fit(
        _Bigram(320), datamodule=resumed, ckpt_path=ckpt_path
    )
    assert resumed.chat_template.source == BUILTIN_TEMPLATES["chatml"]
    assert resumed.tokenizer.to_str() == dm.tokenizer.to_str()


def test_the_tokenizers_own_template_is_the_default(
    tmp_path: Path, tokenizer: Tokenizer, chat_file: Path
) -> None:
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    config = {"chat_template": BUILTIN_TEMPLATES["chatml"], "eos_token": {"content": EOS_TOKEN}}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    dm = _dm(tmp_path, hf_dir, {"path": str(chat_file)}, seq_len=128)
    dm.setup("fit")
    assert dm.chat_template.origin == f"the chat_template of {hf_dir / 'tokenizer_config.json'}"
    assert (
        dm.chat_template.eos_token == EOS_TOKEN
        and dm.state_dict()["chat_template"] == config["chat_template"]
    )
    item = dm.train_dataset[0]
    assert _decode(tokenizer, item["tokens"][item["loss_mask"]]).endswith("<|im_end|>\n")


def test_a_released_tokenizer_without_eos_fine_tunes_and_resumes_with_its_own_tokens(
    tmp_path: Path, chat_file: Path
) -> None:
    """A released tokenizer has its own special tokens and no ``<|eos|>`` (only pretraining needs it):
    windows pad with the template's eos token, and a resume renders with the tokens the checkpoint
    trained with, not the defaults."""
    from tokenizers import AddedToken

    released = train_tokenizer([f"{q} {a}" for q, a in PAIRS] * 10, vocab_size=320)
    released = Tokenizer.from_str(released.to_str().replace(EOS_TOKEN, "<|reserved|>"))
    released.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    assert released.token_to_id(EOS_TOKEN) is None
    hf_dir = tmp_path / "released"
    hf_dir.mkdir()
    released.save(str(hf_dir / "tokenizer.json"))
    config = {"chat_template": BUILTIN_TEMPLATES["chatml"], "eos_token": "<|im_end|>", "bos_token": "<s>"}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    dm = _dm(tmp_path, hf_dir, {"path": str(chat_file)}, vocab_size=330, seq_len=128)
    dm.setup("fit")
    item = dm.train_dataset[0]
    padding = item["documents"] == -1
    assert padding.any() and (item["tokens"][padding] == released.token_to_id("<|im_end|>")).all()
    state = dm.state_dict()
    assert state["chat_tokens"] == ["<s>", "<|im_end|>"]
    fresh = _dm(tmp_path, None, {"path": str(chat_file)}, vocab_size=330, seq_len=128)
    fresh.setup("fit")
    fresh.load_state_dict(state)
    chat = fresh.chat_template
    assert (chat.source, chat.bos_token, chat.eos_token) == (config["chat_template"], "<s>", "<|im_end|>")
    np.testing.assert_array_equal(fresh.train_dataset[0]["tokens"], item["tokens"])
