"""Contracts of the chat templates: rendering, assistant spans by prefix rendering, where templates come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from dsv3_lightning.data.chat import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    choose_template,
    load_chat_template,
    resolve_template,
    template_tokens,
)
from dsv3_lightning.tokenizer import train_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
    {"role": "user", "content": "And json.loads?"},
    {"role": "assistant", "content": "Deserialize s to a Python object."},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = ["User: What does json.dumps do?\n\nAssistant: Serialize obj to a JSON formatted str.\n\n"] * 20
    return train_tokenizer(texts + ["<|im_start|>assistant\nDeserialize s<|im_end|>\n"] * 20, vocab_size=300)


def _chat(name: str) -> ChatTemplate:
    return ChatTemplate(BUILTIN_TEMPLATES[name], origin=name, bos_token="<|bos|>", eos_token="<|eos|>")


def test_dsv3_plain_renders_turns_and_answers_after_the_generation_prompt() -> None:
    chat = _chat("dsv3_plain")
    assert chat.segments(CONVERSATION) == [
        ("Answer briefly.\n\nUser: What does json.dumps do?\n\nAssistant:", False),
        (" Serialize obj to a JSON formatted str.<|eos|>\n\n", True),
        ("User: And json.loads?\n\nAssistant:", False),
        (" Deserialize s to a Python object.<|eos|>\n\n", True),
    ]
    full = chat.render(CONVERSATION, add_generation_prompt=False)
    assert "".join(text for text, _ in chat.segments(CONVERSATION)) == full
    prompt = ChatTemplate(BUILTIN_TEMPLATES["dsv3_plain"], origin="t", bos_token="", eos_token="<|eos|>")
    assert prompt.render(CONVERSATION[:2], add_generation_prompt=True) == (
        "Answer briefly.\n\nUser: What does json.dumps do?\n\nAssistant:"
    )


def test_chatml_is_the_standard_one() -> None:
    chat = _chat("chatml")
    messages = CONVERSATION[1:3]
    assert chat.render(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nWhat does json.dumps do?<|im_end|>\n"
        "<|im_start|>assistant\nSerialize obj to a JSON formatted str.<|im_end|>\n"
    )
    assert chat.segments(messages)[1] == ("Serialize obj to a JSON formatted str.<|im_end|>\n", True)
    assert chat.render(messages[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_piecewise_tokens_decode_to_the_text_and_prompts_tokenize_as_at_generation(tokenizer, name) -> None:
    chat = _chat(name)
    segments = chat.segments(CONVERSATION)
    ids = [i for text, _ in segments for i in tokenizer.encode(text, add_special_tokens=False).ids]
    assert tokenizer.decode(ids, skip_special_tokens=False) == chat.render(
        CONVERSATION, add_generation_prompt=False
    )
    # The tokens before each answer are exactly the tokens of the prompt rendered alone.
    answers = iter(i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant")
    for n, (_, is_answer) in enumerate(segments):
        if is_answer:
            before = [
                i for text, _ in segments[:n] for i in tokenizer.encode(text, add_special_tokens=False).ids
            ]
            prompt = chat.render(CONVERSATION[: next(answers)], add_generation_prompt=True)
            assert before == tokenizer.encode(prompt, add_special_tokens=False).ids


def test_the_prefix_check_refuses_templates_that_do_not_render_incrementally() -> None:
    other_prompt = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}bot:{% endif %}"
    with pytest.raises(
        ValueError, match=r"f\.jsonl:3: the template t does not render a conversation incrementally"
    ):
        ChatTemplate(other_prompt, origin="the template t").segments(CONVERSATION[1:3], where="f.jsonl:3: ")
    # A template that drops earlier answers from the history (as reasoning templates drop thinking).
    history = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}A: ...\n"
        "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(
        ValueError,
        match=r"does not render a conversation incrementally: rendering the first 4 messages with the generation prompt gives ",
    ):
        ChatTemplate(history, origin="x").segments(CONVERSATION)


def test_render_errors_name_the_template_and_jinjas_message() -> None:
    chat = _chat("dsv3_plain")
    with pytest.raises(ValueError, match=r"a\.jsonl:1: dsv3_plain failed to render this conversation \(TemplateError: "
                       r"dsv3_plain renders system, user and assistant messages, not tool\)"):  # fmt: skip
        chat.render([{"role": "tool", "content": "x"}], add_generation_prompt=False, where="a.jsonl:1: ")
    with pytest.raises(ValueError, match=r"the file t\.jinja is not a valid Jinja template \(line 1: "):
        ChatTemplate("{% for %}", origin="the file t.jinja")


def test_transformers_environment_tojson_and_generation_blocks() -> None:
    chat = ChatTemplate(
        "{% generation %}{{ messages[0].content }}{% endgeneration %}|{{ messages | tojson }}"
        "{% for m in messages %}{% break %}{% endfor %}",
        origin="t",
    )
    assert chat.render([{"role": "user", "content": "<a>"}], add_generation_prompt=False) == (
        '<a>|[{"role": "user", "content": "<a>"}]'
    )


def test_a_tokenizers_own_template(tmp_path: Path, tokenizer) -> None:
    assert load_chat_template(tmp_path) is None
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{{ 'string' }}", "eos_token": {"content": "</s>"}}))
    assert load_chat_template(tmp_path) == "{{ 'string' }}"
    assert resolve_template(None, tmp_path) == ("{{ 'string' }}", f"the chat_template of {config}")
    assert template_tokens(tmp_path, tokenizer) == ("<|bos|>", "</s>")
    config.write_text(
        json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]}
        )
    )
    assert load_chat_template(tmp_path) == "d"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "t"}]}))
    with pytest.raises(
        ValueError, match=r"chat_template is a list of templates \['tool_use'\] with no \"default\""
    ):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ 'file' }}")  # transformers prefers the file
    assert resolve_template(None, tmp_path) == ("{{ 'file' }}", str(tmp_path / "chat_template.jinja"))


def test_where_a_template_comes_from(tmp_path: Path, tokenizer) -> None:
    assert resolve_template("chatml", None) == (BUILTIN_TEMPLATES["chatml"], "the built-in template 'chatml'")
    assert resolve_template("{{ 'x' }}", None)[1] == "the template given in data.conversations.chat_template"
    (tmp_path / "mine.jinja").write_text("{{ 'mine' }}")
    assert resolve_template(str(tmp_path / "mine.jinja"), None) == (
        "{{ 'mine' }}",
        str(tmp_path / "mine.jinja"),
    )
    with pytest.raises(
        ValueError, match=r"chat_template \('chatm'\) is not a built-in template \(dsv3_plain, chatml\)"
    ):
        resolve_template("chatm", None)
    with pytest.raises(
        ValueError, match=r"chat_template is null .* and data\.tokenizer_path is not a directory"
    ):
        resolve_template(None, None)
    with pytest.raises(
        ValueError,
        match=r"the tokenizer's directory .* has none .*Set data\.conversations\.chat_template to a built-in \(dsv3_plain, chatml",
    ):
        resolve_template(None, tmp_path)
    assert template_tokens(None, tokenizer) == ("<|bos|>", "<|eos|>")
    # The checkpoint's template wins over the directory's when the key is null, not over an explicit one.
    checkpoint = ChatTemplate.from_checkpoint(
        {"chat_template": "{{ 'ckpt' }}", "chat_tokens": ["<s>", "</s>"]}, tokenizer
    )
    chosen = choose_template(None, tokenizer_dir=tmp_path, tokenizer=tokenizer, checkpoint=checkpoint)
    assert chosen.origin == "the checkpoint's chat template"
    assert (chosen.bos_token, chosen.eos_token) == ("<s>", "</s>")  # the tokens it trained with, kept
    assert (
        choose_template("chatml", tokenizer_dir=None, tokenizer=tokenizer, checkpoint=checkpoint).source
        == BUILTIN_TEMPLATES["chatml"]
    )
    assert choose_template(None, tokenizer_dir=tmp_path, tokenizer=tokenizer, required=False) is None


# A template in the style of DeepSeek's releases (written here): a namespace carrying the system prompt,
# BOS first, full-width role markers, the end-of-sentence token after each answer.
DEEPSEEK_STYLE = (
    "{% set ns = namespace(system='') %}"
    "{%- for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endif %}{% endfor -%}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


@pytest.mark.parametrize("name", ["dsv3_plain", "chatml", "deepseek_style"])
def test_an_exported_template_renders_in_transformers_as_here(name: str, tmp_path: Path, tokenizer) -> None:
    """What ``dsv3 convert`` writes (tokenizer.json + tokenizer_config.json) loads in transformers, whose
    ``apply_chat_template`` renders every prefix exactly as this module does: the prompt a fine-tuned
    model sees elsewhere is the one it was trained after."""
    transformers = pytest.importorskip("transformers")
    source = DEEPSEEK_STYLE if name == "deepseek_style" else BUILTIN_TEMPLATES[name]
    chat = ChatTemplate(source, origin=name, bos_token="<|bos|>", eos_token="<|eos|>")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(chat.tokenizer_config()))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for end in range(1, len(CONVERSATION) + 1):
        for generation in (True, False):
            ours = chat.render(CONVERSATION[:end], add_generation_prompt=generation)
            assert theirs.apply_chat_template(
                CONVERSATION[:end], tokenize=False, add_generation_prompt=generation
            ) == ours, (name, end, generation)
    answers = [text for text, is_answer in chat.segments(CONVERSATION) if is_answer]
    assert answers[-1].startswith(" Deserialize" if name == "dsv3_plain" else "Deserialize")
