"""``--print_config`` prints every option's documentation as YAML comments (ruamel.yaml, and
jsonargparse's attribute docstrings for ModelConfig's fields)."""

from __future__ import annotations

import pytest
from test_cli import ROOT

from dsv3_lightning.cli import main


@pytest.fixture(autouse=True)
def _plain_argv(plain_argv):
    """Every test here calls the CLI."""


def _print_config(capsys, flag: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), flag])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--print_config", "--print_config=comments"])
def test_print_config_documents_every_option(capsys, flag):
    out = _print_config(capsys, flag)
    # An __init__ argument (the module's docstring) and a ModelConfig field (its attribute docstring).
    assert (
        "  # Peak learning rate of the default AdamW schedule. (type: float, default: 0.003)\n"
        "  learning_rate: 0.003\n"
    ) in out
    assert (
        "    # Number of transformer blocks (multi-token prediction modules not included)."
        " (required, type: int)\n"
        "    num_hidden_layers: 4\n"
    ) in out


def test_explicit_flags_are_taken_as_given(capsys):
    out = _print_config(capsys, "--print_config=skip_default")
    assert "learning_rate" not in out and "num_hidden_layers: 4" in out
    assert "#" not in out.split("trainer:")[1]  # no comments
