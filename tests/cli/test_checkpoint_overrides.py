"""``--ckpt_path`` against the config (checkpoint_overrides.py): warned with both values for
validate, refused for a resumed fit of another model and for a vocabulary the checkpoint cannot read."""

from __future__ import annotations

import csv

import pytest
from jsonargparse import Namespace
from test_cli import ROOT, fit, write_config

from dsv3_lightning.checkpoint_overrides import disagreements
from dsv3_lightning.cli import main


@pytest.fixture(autouse=True)
def _plain_argv(plain_argv):
    """Every test here calls the CLI."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A 2-layer model trained 2 steps (test_cli's small shape), and its last checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["dsv3"])
        fit(root, corpus, 2)
    return root, root / "run" / "version_0" / "checkpoints" / "last.ckpt"


def _run(subcommand: str, trained, corpus, *extra: str) -> None:
    root, ckpt = trained
    config = write_config(root, corpus, 4)
    main([subcommand, "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(config),
          "--ckpt_path", str(ckpt), *extra])


def _warnings(capsys) -> list[str]:
    lines = capsys.readouterr().err.splitlines()
    return [line for line in lines if line.startswith("WARNING dsv3_lightning.cli: ")]


def test_validate_warns_with_both_values_and_evaluates_the_checkpoints_model(trained, corpus, capsys):
    _run("validate", trained, corpus, "--model.config.num_hidden_layers", "4", "--model.learning_rate", "0.1")
    assert _warnings(capsys) == [
        "WARNING dsv3_lightning.cli: model.config.num_hidden_layers: the checkpoint has 2, "
        "the config asks 4; validating the checkpoint's model (2). Remove the setting or use another checkpoint.",
        "WARNING dsv3_lightning.cli: model.learning_rate: the checkpoint has 0.003, the config asks 0.1; "
        "validating with the checkpoint's value (0.003). Remove the setting or use another checkpoint.",
    ]
    root, _ = trained
    rows = list(csv.DictReader(open(sorted((root / "run").iterdir())[-1] / "metrics.csv")))
    assert any(r.get("val/loss") for r in rows)  # it ran, on the 2-layer weights (4 layers would not load)


def test_the_same_config_says_nothing(trained, corpus, capsys):
    _run("validate", trained, corpus)
    assert _warnings(capsys) == []


def test_a_resumed_fit_of_another_model_is_refused(trained, corpus):
    with pytest.raises(ValueError, match=(
        r"^--ckpt_path \S+last\.ckpt holds another model than the config asks \(model\.config\.hidden_size: "
        r"the checkpoint has 32, the config asks 64; model\.config\.num_hidden_layers: the checkpoint has 2, "
        r"the config asks 4\)\. A resumed fit continues the checkpoint's model: remove these settings, or "
        r"leave out --ckpt_path to train the model asked for from the start\.$"
    )):
        _run("fit", trained, corpus,
             "--model.config.num_hidden_layers", "4", "--model.config.hidden_size", "64")


def test_a_resumed_fit_warns_which_training_setting_it_keeps(trained, corpus, capsys):
    _run("fit", trained, corpus, "--model.warmup_steps", "5")
    assert _warnings(capsys) == [
        "WARNING dsv3_lightning.cli: model.warmup_steps: the checkpoint has 2, the config asks 5; "
        "resuming with the checkpoint's value (2). Remove the setting or use another checkpoint."
    ]


def test_a_vocabulary_the_checkpoint_cannot_read_is_refused(trained, corpus):
    with pytest.raises(ValueError, match=(
        r"^data\.vocab_size \(400\) differs from model\.config\.vocab_size \(300\) of the checkpoint "
        r"--ckpt_path \S+last\.ckpt: its embedding and output head have 300 rows\. Set data\.vocab_size "
        r"to 300, or use another checkpoint\.$"
    )):
        _run("validate", trained, corpus, "--data.vocab_size", "400")


def test_only_settings_the_user_set_are_reported():
    asked = Namespace(config=Namespace(num_hidden_layers=4, rope_theta=10000.0, vocab_size=99), heads=None)
    defaults = Namespace(
        config=Namespace(num_hidden_layers=None, rope_theta=10000.0, vocab_size=None), heads=None
    )
    hparams = {"config": {"num_hidden_layers": 2, "rope_theta": 5000.0, "vocab_size": 300}, "heads": [],
               "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    found = disagreements(asked, defaults, hparams)
    assert [(d.key, d.checkpoint, d.asked) for d in found] == [("model.config.num_hidden_layers", 2, 4)]


def test_heads_are_compared_by_the_class_not_the_path_that_names_it():
    yaml = Namespace(class_path="dsv3_lightning.plugins.mtp.MultiTokenPrediction",
                     init_args=Namespace(depth=1, loss_weight=0.3))
    saved = {"class_path": "dsv3_lightning.plugins.mtp.head.MultiTokenPrediction",
             "init_args": {"depth": 1, "loss_weight": 0.3}}  # head_spec's
    assert disagreements(Namespace(heads=[yaml]), Namespace(heads=None), {"heads": [saved]}) == []


def test_heads_are_compared_whole():
    spec = Namespace(class_path="dsv3_lightning.plugins.mtp.MultiTokenPrediction",
                     init_args=Namespace(depth=1, loss_weight=0.3))
    found = disagreements(Namespace(heads=[spec]), Namespace(heads=None), {"heads": []})
    assert [str(d) for d in found] == [
        "model.heads: the checkpoint has [], the config asks [MultiTokenPrediction(depth=1, loss_weight=0.3)]"
    ]
    assert found[0].warning("test") == (
        "model.heads: the checkpoint has [], the config asks "
        "[MultiTokenPrediction(depth=1, loss_weight=0.3)]; testing the checkpoint's model ([]). Remove the setting or use another checkpoint."
    )


def test_warnings_are_logged_on_rank_zero_only(trained, corpus, capsys, monkeypatch):
    monkeypatch.setattr("lightning.pytorch.utilities.rank_zero.rank_zero_only.rank", 1)
    _run("validate", trained, corpus, "--model.config.num_hidden_layers", "4")
    assert _warnings(capsys) == []
