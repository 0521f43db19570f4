"""Bad input to ``dsv3``, reported by the one message that explains it, as the last line.

jsonargparse checks a ``class_path`` value against every member of its option's type union
(``trainer.strategy: str | Strategy``; ``trainer.plugins: Precision | ClusterEnvironment |
CheckpointIO | LayerSync | list[...] | None``) and, when no member accepts it, raises one
``ValueError`` whose text nests every member's failure: 56-93 lines that end in "Given value: ...",
with the useful one somewhere inside. The exception objects of the members are gone by then
(jsonargparse chains only the first member's failure as ``__cause__``), so they are found where they
arise. Two moments matter:

- **Parse time** (``parse_args``): class paths are imported and ``init_args`` are checked against
  the constructor's signature, but nothing is constructed. A misspelt class path, an unknown or a
  missing init arg ends in ``parser.error(dump)``; ``short_parse_error`` turns the dump into the
  key, the innermost "Problem with given class_path" entry and a fix (the close spellings). Other
  parse errors (an unknown key, a value of the wrong type) are short already and pass unchanged.
- **Instantiation time** (``LightningCLI.instantiate_classes`` → ``parser.instantiate``): the
  constructors run, and a plugin's ``__init__`` rejects a value with the project's own message (the
  YAML key, the value, the fix: ``trainer.plugins[FP8Precision].recipe ('blockwize') is not a
  recipe; ...``), which jsonargparse then buries in the dump. ``ConstructorErrors`` is a jsonargparse
  instantiator (the library's hook around every class it constructs) that records what each
  constructor raised; ``explaining`` picks the recorded exception that the dump quotes, and the CLI
  raises that one, unchanged, instead of the dump.

The dump is kept for debugging behind jsonargparse's own switch, ``JSONARGPARSE_DEBUG=true``: at
parse time jsonargparse then raises with the full text, and at instantiation time the dump is
chained as the cause, so it is printed above the project's message, which stays the last line.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pkgutil
import re
from typing import Any

_PROBLEM = re.compile(r"^(?P<indent>\s*)(?:- )?Problem with given class_path '(?P<path>[^']+)':\s*$")
_PARSER_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":')
_NO_ATTRIBUTE = re.compile(r"module '(?P<module>[^']+)' has no attribute '(?P<name>[^']+)'")
_NOT_ACCEPTED = re.compile(r"Option '(?:init_args\.)?(?P<name>[^']+)' is not accepted")
_REQUIRED = re.compile(r"the following arguments are required: (?P<names>.+)")


def debug_requested() -> bool:
    """jsonargparse's switch for full error reports (it accepts only 'true' and 'false')."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true"


def short_parse_error(message: str, prog: str) -> str | None:
    """One line for a parse error whose text is a union dump around a class_path problem, else None.

    ``prog`` is the failing parser's program name (``dsv3 fit``), used in the ``--KEY.help`` hint.
    """
    lines = message.splitlines()
    key_match = _PARSER_KEY.match(lines[0]) if lines else None
    problems = []  # (indent, class_path, reason lines)
    for i, line in enumerate(lines):
        match = _PROBLEM.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        reason = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            if following.strip():
                reason.append(following.strip())
        problems.append((indent, match["path"], reason))
    if not key_match or not problems:
        return None
    # The innermost problem is the most specific one (a class inside another's init_args).
    _, class_path, reason = max(problems, key=lambda p: p[0])
    key = key_match["key"]
    reason_text = " ".join(line for line in reason if not _PROBLEM.match(line)) or "it is not valid here"
    return f"{key}: class_path '{class_path}': {reason_text}; {_fix(reason_text, class_path, key, prog)}"


def _fix(reason: str, class_path: str, key: str, prog: str) -> str:
    """The advice that follows a class_path problem: close spellings, or where the options are listed."""
    help_hint = f"`{prog} --{key}.help {class_path}` lists its init_args"
    if match := _NO_ATTRIBUTE.search(reason):
        module = importlib.import_module(match["module"])  # imported already: it lacks the attribute
        names = [n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_")]
        close = difflib.get_close_matches(match["name"], names, n=3, cutoff=0.6)
        if not close and hasattr(module, "__path__"):  # a package: the name may be a misspelt module
            names = [m.name for m in pkgutil.iter_modules(module.__path__) if not m.name.startswith("_")]
            close = difflib.get_close_matches(match["name"], names, n=3, cutoff=0.6)
        if close:
            return "did you mean " + " or ".join(f"'{match['module']}.{n}'" for n in close) + "?"
        return f"check the spelling; {match['module']} has {', '.join(sorted(set(names))) or 'no classes'}"
    if "No module named" in reason:
        return "check the module path (an importable module, e.g. dsv3_lightning.plugins.fp8.FP8Precision)"
    if match := _NOT_ACCEPTED.search(reason):
        name = match["name"]
        close = difflib.get_close_matches(name, _init_parameters(class_path), n=1, cutoff=0.6)
        if close:
            return f"did you mean '{close[0]}'? ({help_hint})"
        return f"remove it ({help_hint})"
    if match := _REQUIRED.search(reason):
        return f"set init_args.{match['names'].split(',')[0].strip()} ({help_hint})"
    return help_hint


def _init_parameters(class_path: str) -> list[str]:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        return list(inspect.signature(cls).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


class ConstructorErrors:
    """A jsonargparse instantiator that constructs each class as the default one does and remembers
    every exception a constructor raised, so that the one jsonargparse wraps can be found again."""

    def __init__(self) -> None:
        self.raised: list[BaseException] = []

    def __call__(self, class_type: type, *args: Any, **kwargs: Any) -> Any:
        try:
            return class_type(*args, **kwargs)
        except Exception as error:
            self.raised.append(error)
            raise

    def explaining(self, error: BaseException) -> BaseException | None:
        """The recorded exception that ``error`` is, or quotes in full (the latest first), else None.

        A union member that failed while another one succeeded leaves a record too; requiring the
        quote ties the answer to this very report.
        """
        text = str(error)
        for raised in reversed(self.raised):
            if raised is error:
                return raised
            lines = [line.strip() for line in str(raised).splitlines() if line.strip()]
            if lines and all(line in text for line in lines):
                return raised
        return None


__all__ = ["ConstructorErrors", "debug_requested", "short_parse_error"]
