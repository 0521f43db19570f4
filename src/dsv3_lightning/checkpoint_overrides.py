"""What ``--ckpt_path`` overrides, said out loud.

LightningCLI (``_parse_ckpt_path``) reads the checkpoint's ``hyper_parameters`` and parses them over
the configuration, so every ``model.*`` value the checkpoint holds replaces the one that the YAML or
the command line gave, without a word: ``dsv3 validate --ckpt_path two_layers.ckpt
--model.config.num_hidden_layers 4`` validates the 2-layer model. Lightning is right that the
weights decide the model; what was missing is saying so. ``disagreements`` compares the settings
asked for (the configuration as parsed, before the checkpoint is applied) with the checkpoint's, and
the CLI acts on them:

- ``model.config.*`` and ``model.heads`` (the model itself) differ: ``fit`` refuses, since a resumed
  fit continues the checkpoint's model and cannot become the one asked for; ``validate``, ``test``
  and ``predict`` warn, naming both values, and evaluate the checkpoint's model.
- Other model settings (learning rate, warm-up, ``nonfinite``, ...) differ: a warning with both
  values; the run uses the checkpoint's (so does the restored optimizer and scheduler state).
- ``data.vocab_size`` differs from the checkpoint's ``model.config.vocab_size``: refused for every
  subcommand. ``data.vocab_size`` is linked to ``model.config.vocab_size`` and the link is applied
  again after the checkpoint's values, so the model would be built with the data's vocabulary and
  the checkpoint's embedding could not load.

Only settings the user set are reported: a value equal to the parser's default counts as not set
(jsonargparse does not record where a value came from), so an explicit ``--model.config.n_group 1``
over a checkpoint with 4 goes unreported, and a checkpoint value the configuration never mentions
is taken silently, as intended. Values in a configuration file count as set, like the command line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from jsonargparse import Namespace

_VERBS = {"fit": "resuming", "validate": "validating", "test": "testing", "predict": "predicting with"}


@dataclass(frozen=True)
class Disagreement:
    """One setting that the checkpoint at ``--ckpt_path`` overrides."""

    key: str
    checkpoint: Any
    asked: Any

    @property
    def is_model(self) -> bool:
        """Part of the model itself (its shape, routing or heads), not of how it is trained."""
        return self.key.startswith("model.config.") or self.key == "model.heads"

    def __str__(self) -> str:
        return f"{self.key}: the checkpoint has {_show(self.checkpoint)}, the config asks {_show(self.asked)}"

    def warning(self, subcommand: str) -> str:
        """The warning for a setting that the run takes from the checkpoint."""
        verb = _VERBS.get(subcommand, subcommand)
        if self.is_model and subcommand != "fit":
            taken = f"{verb} the checkpoint's model ({_show(self.checkpoint)})"
        else:
            taken = f"{verb} with the checkpoint's value ({_show(self.checkpoint)})"
        return f"{self}; {taken}. Remove the setting or use another checkpoint."


def disagreements(asked: Namespace, defaults: Namespace, hparams: dict[str, Any]) -> list[Disagreement]:
    """The ``model.*`` settings in ``asked`` that differ from the parser's ``defaults`` (set by the user)
    and from the checkpoint's ``hparams``; ``model.config.vocab_size`` is left to ``vocab_mismatch``."""
    asked_flat = _flatten(asked.as_dict(), "model")
    default_flat = _flatten(defaults.as_dict(), "model")
    checkpoint_flat = _flatten({k: v for k, v in hparams.items() if not k.startswith("_")}, "model")
    found = []
    for key, value in asked_flat.items():
        if key == "model.config.vocab_size" or key not in checkpoint_flat:
            continue
        if key in default_flat and default_flat[key] == value:
            continue
        if checkpoint_flat[key] != value:
            found.append(Disagreement(key, checkpoint_flat[key], value))
    return found


def vocab_mismatch(data_vocab_size: int, hparams: dict[str, Any], ckpt_path: str) -> str | None:
    """The refusal when the data's vocabulary cannot feed the checkpoint's embedding, else None."""
    model_vocab = (hparams.get("config") or {}).get("vocab_size")
    if model_vocab is None or model_vocab == data_vocab_size:
        return None
    return (
        f"data.vocab_size ({data_vocab_size}) differs from model.config.vocab_size ({model_vocab}) of the "
        f"checkpoint --ckpt_path {ckpt_path}: its embedding and output head have {model_vocab} rows. "
        f"Set data.vocab_size to {model_vocab}, or use another checkpoint."
    )


def refusal(found: list[Disagreement], ckpt_path: str) -> str:
    """The error of a resumed fit whose checkpoint holds another model than the one asked for."""
    settings = "the setting" if len(found) == 1 else "these settings"
    return (
        f"--ckpt_path {ckpt_path} holds another model than the config asks "
        f"({'; '.join(str(d) for d in found)}). A resumed fit continues the checkpoint's model: "
        f"remove {settings}, or leave out --ckpt_path to train the model asked for from the start."
    )


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Dotted keys to leaf values; lists (``heads``, ``betas``) are leaves, compared whole."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: _normalise(value)}


def _normalise(value: Any) -> Any:
    """One form for what YAML, jsonargparse and a checkpoint give: tuples as lists, no Namespaces."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        value = {k: _normalise(v) for k, v in value.items()}
        if isinstance(value.get("class_path"), str):
            value["class_path"] = _defining_path(value["class_path"])
        return value
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _defining_path(class_path: str) -> str:
    """Where the class is defined: YAML names ``plugins.mtp.MultiTokenPrediction``, a checkpoint
    ``plugins.mtp.head.MultiTokenPrediction`` (``head_spec``); the same class either way."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return class_path
    return f"{cls.__module__}.{cls.__qualname__}"


def _show(value: Any) -> str:
    """A value as a user writes it: class specs as ``Name(arg=value)``, strings quoted."""
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={_show(v)}" for k, v in (value.get("init_args") or {}).items())
        return f"{value['class_path'].rpartition('.')[2]}({args})"
    if isinstance(value, str):
        return repr(value)
    return str(value)


__all__ = ["Disagreement", "disagreements", "refusal", "vocab_mismatch"]
