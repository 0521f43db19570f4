"""Chat templates: a conversation rendered to text, and which of its characters are the assistant's.

**Rendering.** A chat template is a Jinja template over ``messages`` (a list of ``{"role", "content"}``
dicts), ``add_generation_prompt``, ``bos_token`` and ``eos_token``, rendered as Hugging Face
``transformers`` renders ``apply_chat_template``: a sandboxed environment
(``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the ``loopcontrols``
extension), the globals ``raise_exception(message)`` and ``strftime_now(format)``, a ``tojson`` filter
that does not escape HTML (transformers replaces Jinja's own, which turns ``<`` into ``\\u003c``), and
``{% generation %}...{% endgeneration %}`` accepted and rendered as plain text (transformers uses it to
mark assistant text; the prefix rendering below finds that text for any template). So a template
renders here exactly as in transformers, and a model fine-tuned here sees at generation time
(``dsv3 generate --chat true``: ``render`` with the generation prompt) the very text it was trained on.

**Assistant spans by prefix rendering.** For each assistant message ``i``:
``P = render(messages[:i], add_generation_prompt=True)`` is the prompt the model is given at generation
time and ``Q = render(messages[:i + 1])`` the same conversation with the answer; ``Q`` must start with
``P`` and ``P`` with the text rendered so far, and the answer is ``Q[len(P):]``: the message's content
and whatever the template puts after it within the turn (an end-of-turn token, a newline). Text
between answers (the prompts, the generation prompts) is context. :meth:`ChatTemplate.segments`
returns the rendered conversation as these pieces; tokenized piece by piece, token boundaries fall
on the piece boundaries, as at generation time (the prompt is tokenized alone, then the model appends
its answer). A template that renders history differently from the turn it is generated in (one that
drops the reasoning of earlier answers, say) breaks the prefix property and is refused: its training
text would not be what the model sees when it answers.

**Where a template comes from** (:func:`resolve_template`, ``data.conversations.chat_template``): a
built-in name (:data:`BUILTIN_TEMPLATES`), a ``.jinja`` file, a literal template, or null for the
tokenizer's own (:func:`load_chat_template`: ``chat_template.jinja`` beside the tokenizer, else the
``chat_template`` of its ``tokenizer_config.json``, as transformers reads them).

Not supported: tools, documents and other template variables than the four above, and messages with
other keys than ``role`` and ``content`` (only those two are given to the template).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from dsv3_lightning.tokenizer import BOS_TOKEN, EOS_TOKEN

_KEY = "data.conversations.chat_template"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"

_DSV3_PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n\\n' }}"
    "{% else %}{{ raise_exception('dsv3_plain renders system, user and assistant messages, not ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "dsv3_plain": _DSV3_PLAIN,
    "chatml": _CHATML,
}
"""The built-in chat templates, by the name ``data.conversations.chat_template`` gives them.

* ``dsv3_plain``: for this repository's byte-level BPE (:mod:`dsv3_lightning.tokenizer`), whose only
  special tokens are ``<|bos|>`` and ``<|eos|>``: plain words as turn markers. A system message is its
  content and a blank line; a user turn ``User: {content}\\n\\n``; an assistant turn
  ``Assistant: {content}<|eos|>\\n\\n``; the generation prompt ``Assistant:`` (no space, so that the
  prompt is a prefix of the answered turn and the answer starts with the space, the way GPT-2's
  pre-tokenizer attaches it to the first word). The model learns to end its answer with ``<|eos|>``,
  where generation stops. The trained answer reads `` {content}<|eos|>\\n\\n``.
* ``chatml``: OpenAI's ChatML as Qwen and many others use it: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``
  per message, the generation prompt ``<|im_start|>assistant\\n``; the trained answer reads
  ``{content}<|im_end|>\\n``. With this repository's tokenizer the markers are plain text (a few
  tokens each), not special tokens.
"""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' marker of assistant text) as plain text."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template with its special tokens and a description of where it came from.

    Args:
        source: The Jinja source.
        origin: Where it came from, for messages: ``"built-in template 'chatml'"``, a file path, ...
        bos_token, eos_token: The strings the template's ``bos_token`` / ``eos_token`` stand for
            (:func:`template_tokens`).
    """

    def __init__(self, source: str, *, origin: str, bos_token: str = "", eos_token: str = "") -> None:
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(
                f"{origin} is not a valid Jinja template (line {err.lineno}: {err.message}). Fix it, or set "
                f"{_KEY} to a built-in ({', '.join(BUILTIN_TEMPLATES)})."
            ) from err
        self.source = source
        self.origin = origin
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], tokenizer: Tokenizer | None) -> ChatTemplate | None:
        """The template a checkpoint's data-module state carries (``checkpoint_state``), or None."""
        if state.get("chat_template") is None:
            return None
        tokens = state.get("chat_tokens") or (template_tokens(None, tokenizer) if tokenizer else ("", ""))
        return cls(state["chat_template"], origin="the checkpoint's chat template", bos_token=tokens[0],
                   eos_token=tokens[1])  # fmt: skip

    @classmethod
    def from_directory(cls, directory: str | Path, tokenizer: Tokenizer | None) -> ChatTemplate | None:
        """A Hugging Face directory's template (``chat_template.jinja`` / ``tokenizer_config.json``), or None."""
        found = _find_chat_template(Path(directory).expanduser())
        if found is None:
            return None
        bos_token, eos_token = template_tokens(directory, tokenizer) if tokenizer else ("", "")
        return cls(found[0], origin=found[1], bos_token=bos_token, eos_token=eos_token)

    def pad_id(self, tokenizer: Tokenizer) -> int:
        """The token that pads conversation windows: the template's end-of-sequence token (``<|eos|>``
        for this repository's tokenizers), else id 0. Padding is never a target and forms a document
        of its own, so the choice only has to be a valid id."""
        token_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        return 0 if token_id is None else token_id

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint's data-module state keeps of it (``from_checkpoint`` reads it back)."""
        return {"chat_template": self.source, "chat_tokens": [self.bos_token, self.eos_token]}

    def tokenizer_config(self) -> dict[str, Any]:
        """``tokenizer_config.json`` of an exported directory, where transformers reads a template."""
        return {"chat_template": self.source, "bos_token": self.bos_token, "eos_token": self.eos_token}

    def render(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool, where: str = ""
    ) -> str:
        """The template's text for ``messages``; ``where`` (``"file:line: "``) prefixes an error."""
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )  # fmt: skip
        except Exception as err:  # Jinja raises TemplateError, TypeError, ... from the template's code
            raise ValueError(
                f"{where}{self.origin} failed to render this conversation ({type(err).__name__}: {err}). Fix "
                f"the conversation, or set {_KEY} to a template that accepts it."
            ) from err

    def segments(self, messages: Sequence[dict[str, str]], *, where: str = "") -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, is_answer)`` pieces, in order (module docstring).

        Their concatenation is ``render(messages, add_generation_prompt=False)``; ``is_answer`` marks
        each assistant message's ``Q[len(P):]``. Empty pieces are left out.
        """
        pieces: list[tuple[str, bool]] = []
        done = ""
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in answers:
            prompt = self.render(messages[:i], add_generation_prompt=True, where=where)
            if not prompt.startswith(done):
                self._not_incremental(
                    where, f"the first {i} messages with the generation prompt", done, prompt
                )
            answered = self.render(messages[: i + 1], add_generation_prompt=False, where=where)
            if not answered.startswith(prompt):
                self._not_incremental(where, f"the first {i + 1} messages", prompt, answered)
            pieces += [(prompt[len(done) :], False), (answered[len(prompt) :], True)]
            done = answered
        if not answers or answers[-1] != len(messages) - 1:
            full = self.render(messages, add_generation_prompt=False, where=where)
            if not full.startswith(done):
                self._not_incremental(where, f"all {len(messages)} messages", done, full)
            pieces.append((full[len(done) :], False))
        return [(text, is_answer) for text, is_answer in pieces if text]

    def _not_incremental(self, where: str, what: str, prefix: str, text: str) -> None:
        at = next((k for k, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))
        raise ValueError(
            f"{where}{self.origin} does not render a conversation incrementally: rendering {what} gives "
            f"{text[max(0, at - 20) : at + 20]!r} at character {at} where the shorter conversation rendered "
            f"{prefix[max(0, at - 20) : at + 20]!r}. The answer tokens are trained after the prompt exactly as "
            "it is rendered at generation time, so the template must render each turn the same whatever "
            f"follows it (one that rewrites earlier turns, e.g. drops their reasoning, cannot). Set {_KEY} to "
            f"such a template, e.g. one of the built-ins ({', '.join(BUILTIN_TEMPLATES)})."
        )


# ----------------------------------------------------------------------- a tokenizer's template


def _read_config(directory: Path) -> dict[str, Any] | None:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}). Fix or remove it.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object. Fix or remove it.")
    return config


def _find_chat_template(directory: Path) -> tuple[str, str] | None:
    """``(source, origin)`` of a tokenizer directory's chat template, as transformers reads it: the
    ``chat_template.jinja`` file first, else ``chat_template`` in ``tokenizer_config.json`` (a string, or a
    list of ``{"name", "template"}`` of which the one named ``default``)."""
    file = directory / TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8"), str(file)
    config = _read_config(directory)
    if config is None or config.get("chat_template") is None:
        return None
    origin = f"the chat_template of {directory / CONFIG_FILE}"
    template = config["chat_template"]
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if not isinstance(named.get("default"), str):
            raise ValueError(
                f"{directory / CONFIG_FILE}: chat_template is a list of templates {sorted(map(str, named))} with "
                f'no "default". Set {_KEY} to the one to use (its source, or a .jinja file holding it).'
            )
        return named["default"], origin + ' (its "default")'
    if not isinstance(template, str):
        raise ValueError(
            f"{directory / CONFIG_FILE}: chat_template is a {type(template).__name__}, not a template string "
            f'or a list of {{"name", "template"}}. Fix it, or set {_KEY}.'
        )
    return template, origin


def load_chat_template(directory: str | Path) -> str | None:
    """The chat template of a tokenizer directory (``chat_template.jinja`` or ``tokenizer_config.json``'s
    ``chat_template``), or None when it has none."""
    found = _find_chat_template(Path(directory).expanduser())
    return None if found is None else found[0]


def tokenizer_directory(tokenizer_path: str | None) -> Path | None:
    """Where a tokenizer's companions (``tokenizer_config.json``, ``chat_template.jinja``) are: the
    directory ``data.tokenizer_path`` names, or the one holding its ``tokenizer.json``."""
    if tokenizer_path is None:
        return None
    path = Path(tokenizer_path).expanduser()
    return path if path.is_dir() else path.parent


def resolve_template(spec: str | None, tokenizer_dir: str | Path | None) -> tuple[str, str]:
    """``(source, origin)`` of ``data.conversations.chat_template``: a built-in name, a literal template
    (it holds ``{%`` or ``{{``), a ``.jinja`` file, or null for the tokenizer directory's own."""
    builtins = ", ".join(BUILTIN_TEMPLATES)
    if spec is None:
        found = None if tokenizer_dir is None else _find_chat_template(Path(tokenizer_dir).expanduser())
        if found is None:
            where = (
                "data.tokenizer_path is not a directory to read one from" if tokenizer_dir is None else
                f"the tokenizer's directory {tokenizer_dir} has none ({TEMPLATE_FILE}, or chat_template in {CONFIG_FILE})"
            )  # fmt: skip
            raise ValueError(
                f"{_KEY} is null (the tokenizer's own chat template) and {where}. Set {_KEY} to a built-in "
                f"({builtins}; dsv3_plain suits this repository's tokenizers), a .jinja file, or a template."
            )
        return found
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec], f"the built-in template {spec!r}"
    if "{%" in spec or "{{" in spec:
        return spec, f"the template given in {_KEY}"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(
            f"{_KEY} ({spec!r}) is not a built-in template ({builtins}), an existing .jinja file, or a Jinja "
            "template (one holds {% or {{). Name a built-in, point it at a file, or give the template itself."
        )
    return path.read_text(encoding="utf-8"), str(path)


def _token_text(value: Any) -> str | None:
    """A special token of ``tokenizer_config.json``: a string, or a dict with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def template_tokens(tokenizer_dir: str | Path | None, tokenizer: Tokenizer) -> tuple[str, str]:
    """``(bos_token, eos_token)`` for a template: those of the directory's ``tokenizer_config.json``,
    else ``<|bos|>`` / ``<|eos|>`` when the tokenizer has them, else empty."""
    config = (_read_config(Path(tokenizer_dir).expanduser()) if tokenizer_dir is not None else None) or {}
    tokens = []
    for key, default in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN)):
        text = _token_text(config.get(key))
        if text is None:
            text = default if tokenizer.token_to_id(default) is not None else ""
        tokens.append(text)
    return tokens[0], tokens[1]


def choose_template(
    spec: str | None,
    *,
    tokenizer_dir: str | Path | None,
    tokenizer: Tokenizer,
    checkpoint: ChatTemplate | None = None,
    required: bool = True,
) -> ChatTemplate | None:
    """The chat template to render with: ``spec`` (``data.conversations.chat_template``) when given;
    when null, ``checkpoint`` (a checkpoint's, with the special tokens it trained with: it wins as the
    checkpoint's tokenizer does), else the tokenizer directory's own. With none found, an error, or None
    when not ``required`` (a checkpoint may still bring one). The special tokens of a template not the
    checkpoint's are :func:`template_tokens`'."""
    if spec is None and checkpoint is not None:
        return checkpoint
    try:
        source, origin = resolve_template(spec, tokenizer_dir)
    except ValueError:
        if spec is None and not required:
            return None
        raise
    bos_token, eos_token = template_tokens(tokenizer_dir, tokenizer)
    return ChatTemplate(source, origin=origin, bos_token=bos_token, eos_token=eos_token)


__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatTemplate",
    "choose_template",
    "load_chat_template",
    "resolve_template",
    "template_tokens",
    "tokenizer_directory",
]
