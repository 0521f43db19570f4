"""``dsv3``: LightningCLI over DSV3LightningModule and DSV3DataModule.

    dsv3 fit --config configs/tiny.yaml
    dsv3 fit --config configs/tiny.yaml --trainer.max_steps 100 --model.config.num_hidden_layers 2
    dsv3 validate --config configs/tiny.yaml --ckpt_path runs/tiny/.../last.ckpt
    dsv3 fit --config configs/tiny.yaml --print_config        # the full, commented configuration
    dsv3 prepare my_corpus/ --output prepared/ --workers 8  # tokenize once into shards every rank reads
    dsv3 generate --ckpt_path runs/tiny/.../last.ckpt --prompt "Once upon a time"
    dsv3 convert runs/tiny/.../last.ckpt hf_dir/              # Lightning checkpoint <-> Hugging Face
    dsv3 sweep configs/sweeps/load_balancing.yaml             # named variants, results table and plots

Plugins are named by class path in ``trainer.plugins``, ``trainer.callbacks``, ``trainer.strategy``
and ``model.heads``. ``data.vocab_size`` is linked to ``model.config.vocab_size`` (set it once, under
``data``), and a sequence longer than the model's positions is rejected before anything is built.

What the console shows, and how (each piece has its own module with the design):

- Bad input ends with the message that explains it (cli_errors.py): a plugin's own ``ValueError``
  instead of jsonargparse's union dump, one line for a misspelt class path or init arg.
- ``--ckpt_path`` names each setting of the config that the checkpoint overrides, and refuses what
  cannot work (checkpoint_overrides.py).
- A terminal gets Lightning's TQDM bar; when stdout (where TQDM draws) is not a terminal, a log line
  every ``trainer.log_every_n_steps`` steps goes to stderr (progress.py). The model summary states
  the training FLOPs (summary.py). ``trainer.enable_progress_bar`` / ``enable_model_summary`` and
  callbacks of those kinds in ``trainer.callbacks`` work as in Lightning.
- ``--print_config`` prints every option's documentation as YAML comments (``--print_config=FLAGS``
  prints exactly what the flags ask).

Shard-first construction: when the class of ``trainer.strategy`` sets ``builds_shards_first = True``,
the module is built on the meta device (``module.building_on_meta``): the strategy cuts it and
``configure_model`` materialises only what the rank keeps. Every other strategy gets the module
built as always.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from dsv3_lightning import checkpoint_overrides
from dsv3_lightning.cli_errors import ConstructorErrors, debug_requested, short_parse_error
from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.module import DSV3LightningModule, building_on_meta
from dsv3_lightning.progress import LogProgress
from dsv3_lightning.sharded_checkpoint import is_sharded_checkpoint, read_objects
from dsv3_lightning.sharded_checkpoint_io import ShardedCheckpointIO
from dsv3_lightning.summary import TrainingFlopsSummary

log = logging.getLogger(__name__)


class DSV3ArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with short class_path errors and a commented ``--print_config``."""

    @override
    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        short = None if debug_requested() else short_parse_error(message, _command(parser))
        super().error(short or message, ex)

    @override
    def _parse_optional(self, arg_string: str):
        # jsonargparse turns a bare --print_config into --print_config= (no flags) at this very
        # point; the documentation of every option is what a bare --print_config is for here.
        if arg_string == "--print_config":
            arg_string = "--print_config=comments"
        return super()._parse_optional(arg_string)


def _command(parser: LightningArgumentParser) -> str:
    """``dsv3 fit``: the failing parser's command, with the subcommand when the main parser reports
    an error of the subcommand's (it checks the whole configuration after the subcommand's parse)."""
    command = parser.prog.replace(" [options]", "")
    for action in parser._actions:
        if isinstance(action.choices, dict):  # the subcommands
            given = [a for a in getattr(parser, "args", None) or [] if a in action.choices]
            return f"{command} {given[0]}" if given else command
    return command


class DSV3CLI(LightningCLI):
    """LightningCLI over the DeepSeek-V3 module and data, through LightningCLI's own hooks only:
    ``parse_arguments`` keeps what was asked before ``--ckpt_path`` applies the checkpoint's
    hyperparameters, ``before_instantiate_classes`` checks the two against each other and the
    sequence length against the positions, ``instantiate_classes`` reports a constructor's own
    error, and ``instantiate_trainer`` adds the console's progress bar and summary."""

    def __init__(
        self, *args: Any, parser_class: type[LightningArgumentParser] = DSV3ArgumentParser, **kwargs: Any
    ) -> None:
        self._asked: Namespace | None = None
        super().__init__(*args, parser_class=parser_class, **kwargs)

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # The attribute docstrings of ModelConfig and the other dataclasses become --help text and
        # --print_config comments (a jsonargparse setting of the process, as it has no other scope).
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # What was asked, before LightningCLI parses a --ckpt_path's hyperparameters over it.
        subcommand = self.config.get("subcommand")
        self._asked = self.config[subcommand].clone() if subcommand else None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._check_checkpoint_overrides(config)
        seq_len = config.data.seq_len
        max_positions = config.model.config.max_position_embeddings
        if seq_len > max_positions:
            raise ValueError(
                f"data.seq_len ({seq_len}) exceeds model.config.max_position_embeddings ({max_positions}); "
                f"lower data.seq_len or raise max_position_embeddings to at least {seq_len}"
            )

    def _check_checkpoint_overrides(self, config: Namespace) -> None:
        """Warns about, or refuses, the settings that --ckpt_path's hyperparameters override."""
        ckpt_path = config.get("ckpt_path")
        if not self.subcommand or self._asked is None or not ckpt_path:
            return
        if is_sharded_checkpoint(ckpt_path):  # the objects only: no tensor is read
            checkpoint = read_objects(ckpt_path)
        elif Path(ckpt_path).is_file():
            # mmap: only the hyperparameters are read, not the weights (Lightning loaded them already).
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        else:
            return  # Lightning applies nothing either ("last", "best" and the like are not paths)
        hparams = checkpoint.get("hyper_parameters")
        if not hparams:
            return
        refusal = checkpoint_overrides.vocab_mismatch(self._asked.data.vocab_size, hparams, str(ckpt_path))
        if refusal:
            raise ValueError(refusal)
        defaults = self._parser(self.subcommand).get_defaults().model
        found = checkpoint_overrides.disagreements(self._asked.model, defaults, hparams)
        model = [d for d in found if d.is_model]
        if self.subcommand == "fit" and model:
            raise ValueError(checkpoint_overrides.refusal(model, str(ckpt_path)))
        if rank_zero_only.rank == 0:
            for disagreement in found:
                log.warning(disagreement.warning(self.subcommand))

    @override
    def instantiate_classes(self) -> None:
        """Lightning's, raising a constructor's own exception instead of jsonargparse's report around it."""
        constructors = ConstructorErrors()
        # Registered after Lightning's own instantiators (model, data), which keep precedence.
        self.parser.add_instantiator(constructors, object, subclasses=True)
        config = self.config[self.subcommand] if self.subcommand else self.config
        strategy = config.get("trainer", {}).get("strategy") if "trainer" in config else None
        try:
            with building_on_meta() if builds_shards_first(strategy) else nullcontext():
                super().instantiate_classes()
        except Exception as report:
            own = constructors.explaining(report)
            if own is None or own is report:
                raise
            log.debug("jsonargparse reported: %s", report)
            if debug_requested():
                raise own from report
            raise own from None

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        plugins = _as_list(kwargs.get("plugins", config.get("plugins")))
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # every strategy reads a sharded directory
            kwargs["plugins"] = [*plugins, ShardedCheckpointIO()]
        if added := console_callbacks(config, interactive=sys.stdout.isatty()):
            kwargs["callbacks"] = [*_as_list(kwargs.get("callbacks", config.get("callbacks"))), *added]
            if any(isinstance(c, ModelSummary) for c in added):
                # The flag only adds Lightning's default summary (and logs that it skips it when
                # a summary is among the callbacks); ours is there.
                kwargs["enable_model_summary"] = False
        return super().instantiate_trainer(**kwargs)


def builds_shards_first(strategy: Any) -> bool:
    """Whether ``trainer.strategy`` (a name, a ``class_path`` namespace or an instance) is of a class
    that sets ``builds_shards_first``: it cuts a model built on the meta device before it has values."""
    if isinstance(strategy, Namespace):
        strategy = strategy.get("class_path")
    if isinstance(strategy, str):
        from lightning.pytorch.strategies import StrategyRegistry

        if strategy in StrategyRegistry:
            cls = StrategyRegistry[strategy]["strategy"]
        else:
            module_name, _, name = strategy.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_name), name) if module_name else None
            except (ImportError, AttributeError):
                cls = None  # not a class path: Lightning's own check reports it
    else:
        cls = type(strategy)
    return bool(getattr(cls, "builds_shards_first", False))


def console_callbacks(trainer_config: Namespace, interactive: bool) -> list[Callback]:
    """The progress bar and model summary that replace Lightning's defaults (Rich's, when rich is
    installed: "Epoch 0/-2" with open epochs, "Total FLOPs: 0"), unless the trainer turns them off
    or its callbacks have their own: TQDM's bar when stdout is a terminal (it draws there), else
    ``LogProgress`` lines."""
    if trainer_config.get("barebones"):
        return []
    given = _as_list(trainer_config.get("callbacks"))
    added: list[Callback] = []
    wants_bar = trainer_config.get("enable_progress_bar") is not False
    if wants_bar and not any(isinstance(c, ProgressBar) for c in given):
        added.append(TQDMProgressBar() if interactive else LogProgress())
    wants_summary = trainer_config.get("enable_model_summary") is not False
    if wants_summary and not any(isinstance(c, ModelSummary) for c in given):
        added.append(TrainingFlopsSummary())
    return added


def _as_list(callbacks: Any) -> list:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


class _StderrHandler(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is at that moment (redirected or captured)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _enable_logging() -> None:
    """Shows this package's INFO messages (data preparation, parameter counts) like Lightning's own."""
    logger = logging.getLogger("dsv3_lightning")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def tool_commands() -> dict[str, str]:
    """Subcommands that are not LightningCLI's: name -> module whose ``main(argv)`` runs it."""
    return {
        "prepare": "dsv3_lightning.data.command",
        "generate": "dsv3_lightning.generate",
        "convert": "dsv3_lightning.convert",
        "sweep": "dsv3_lightning.sweep",
        "plan": "dsv3_lightning.plugins.plan",
    }


def main(args: list[str] | None = None) -> None:
    """The ``dsv3`` console script (returns nothing: a console script would print a return value)."""
    _enable_logging()
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in tool_commands():
        importlib.import_module(tool_commands()[argv[0]]).main(argv[1:])
        return
    # Our training sampler resumes mid-epoch through the data module's checkpoint state, which
    # Lightning's check for stateful dataloaders does not see.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    DSV3CLI(
        DSV3LightningModule,
        DSV3DataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


if __name__ == "__main__":
    main()
