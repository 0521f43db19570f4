"""``dsv3``: LightningCLI over DSV3LightningModule and DSV3DataModule.

    dsv3 fit --config configs/tiny.yaml
    dsv3 fit --config configs/tiny.yaml --trainer.max_steps 100 --model.config.num_hidden_layers 2
    dsv3 validate --config configs/tiny.yaml --ckpt_path runs/tiny/.../last.ckpt
    dsv3 fit --config configs/tiny.yaml --print_config        # the full, commented configuration
    dsv3 generate --ckpt_path runs/tiny/.../last.ckpt --prompt "Once upon a time"
    dsv3 convert runs/tiny/.../last.ckpt hf_dir/              # Lightning checkpoint <-> Hugging Face
    dsv3 sweep configs/sweeps/load_balancing.yaml             # named variants, results table and plots

Plugins are named by class path in ``trainer.plugins``, ``trainer.callbacks``, ``trainer.strategy``
and ``model.heads``. ``data.vocab_size`` is linked to ``model.config.vocab_size`` (set it once, under
``data``), and a sequence longer than the model's positions is rejected before anything is built.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.module import DSV3LightningModule


class DSV3CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        seq_len = config.data.seq_len
        max_positions = config.model.config.max_position_embeddings
        if seq_len > max_positions:
            raise ValueError(
                f"data.seq_len ({seq_len}) exceeds model.config.max_position_embeddings ({max_positions}); "
                f"lower data.seq_len or raise max_position_embeddings to at least {seq_len}"
            )


def _enable_logging() -> None:
    """Shows this package's INFO messages (data preparation, parameter counts) like Lightning's own."""
    logger = logging.getLogger("dsv3_lightning")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def tool_commands() -> dict[str, str]:
    """Subcommands that are not LightningCLI's: name -> module whose ``main(argv)`` runs it."""
    return {
        "generate": "dsv3_lightning.generate",
        "convert": "dsv3_lightning.convert",
        "sweep": "dsv3_lightning.sweep",
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
