"""The fine-tuning worked example end to end, small: pre-train, export, validate before, fine-tune on
conversations (MTP included), export with the chat template, answer with ``dsv3 generate --chat``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import OVERRIDES, ROOT, fit
from test_generate_convert import MTP

from dsv3_lightning.cli import main
from dsv3_lightning.generate import run
from dsv3_lightning.loading import load_trained
from dsv3_lightning.tokenizer import train_tokenizer

FINETUNE = ROOT / "configs" / "finetune_tiny.yaml"
QUESTIONS = [
    ("What does colorsys.rgb_to_hsv do?", "Convert the color from RGB coordinates to HSV coordinates."),
    ("What does bisect.insort do?", "Insert item x in list a, and keep it sorted assuming a is sorted."),
    ("What does glob.glob do?", "Return a list of paths matching a pathname pattern."),
    ("What does shlex.split do?", "Split the string s using shell-like syntax."),
    ("What does keyword.iskeyword do?", "Return whether a string is a Python keyword."),
    ("What does glob.escape do?", "Escape all special characters."),
]


@pytest.fixture(autouse=True)
def _plain_argv(plain_argv):
    """Every test here calls the CLI."""


def finetune_overrides(root: Path, hf_dir: Path, conversations: Path, max_steps: int) -> Path:
    """The test's small shape (test_cli's) over configs/finetune_tiny.yaml, on ``conversations``."""
    base = yaml.safe_load(OVERRIDES.format(max_steps=max_steps, root=root, corpus="null", cache=root / "cache"))
    base["model"]["init_from"] = str(hf_dir)
    base["model"]["config"]["num_nextn_predict_layers"] = 1  # its config.json says so: it has an MTP module
    base["model"]["config"]["max_position_embeddings"] = 160  # a conversation is ~100 tokens of a 300-token BPE
    base["data"] = {
        "tokenizer_path": str(hf_dir), "vocab_size": 300, "seq_len": 150, "batch_size": 2, "val_fraction": 0.34,
        "conversations": {"path": str(conversations), "chat_template": "dsv3_plain"},
    }  # fmt: skip
    mtp = yaml.safe_load(MTP)
    base["model"]["heads"], base["data"]["extra_tokens"] = mtp["model"]["heads"], mtp["data"]["extra_tokens"]
    path = root / "finetune.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(base))
    return path


def metrics(root: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    with open(sorted((root / "run").iterdir())[-1] / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value:
                    out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus):
    """A model pre-trained 3 steps with an MTP module (test_cli's shape, 160 positions), exported as a Hugging
    Face directory."""
    root = tmp_path_factory.mktemp("pretrained")
    (root / "mtp.yaml").write_text(MTP)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["dsv3"])
        fit(root, corpus, 3, "--config", str(root / "mtp.yaml"), "--model.config.max_position_embeddings", "160")
        main(["convert", str(next(root.glob("run/version_0/checkpoints/last.ckpt"))), str(root / "hf")])
    conversations = root / "qa.jsonl"
    lines = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS]
    lines += [{"prompt": q, "completion": a} for q, a in QUESTIONS]  # the other accepted form
    conversations.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "hf", conversations


def test_finetune_validate_export_and_chat(pretrained, tmp_path, capsys):
    hf_dir, conversations = pretrained
    config = finetune_overrides(tmp_path / "before", hf_dir, conversations, 4)
    main(["validate", "--config", str(FINETUNE), "--config", str(config)])
    before = metrics(tmp_path / "before")["val/loss"]

    config = finetune_overrides(tmp_path / "ft", hf_dir, conversations, 4)
    main(["fit", "--config", str(FINETUNE), "--config", str(config)])
    logged = metrics(tmp_path / "ft")
    assert sorted(logged["train/loss"]) == [0, 1, 2, 3] and "train/mtp_loss" in logged
    for step, targets in logged["train/target_tokens"].items():  # the answers only: most positions masked
        assert 0 < targets < logged["train/masked_tokens"][step]
    assert len(logged["val/loss"]) == 2 and all(torch.isfinite(torch.tensor(v)) for v in logged["val/loss"].values())
    assert next(iter(before.values())) > 0

    checkpoint = next((tmp_path / "ft").glob("run/version_0/checkpoints/last.ckpt"))
    state = torch.load(checkpoint, weights_only=False)["DSV3DataModule"]
    assert "Assistant:" in state["chat_template"]
    exported = tmp_path / "ft_hf"
    main(["convert", str(checkpoint), str(exported)])
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == state["chat_template"] and tokenizer_config["eos_token"] == "<|eos|>"
    capsys.readouterr()
    from_checkpoint = run(str(checkpoint), "What does glob.glob do?", max_new_tokens=8, chat=True)
    printed = capsys.readouterr().out
    assert printed.startswith("User: What does glob.glob do?\n\nAssistant:")
    assert run(str(exported), "What does glob.glob do?", max_new_tokens=8, chat=True) == from_checkpoint
    back = tmp_path / "back.ckpt"  # and into a .ckpt again: the template travels
    main(["convert", str(exported), str(back)])
    assert load_trained(back).chat.checkpoint_state() == load_trained(checkpoint).chat.checkpoint_state()


def test_chat_needs_a_template_and_system_needs_chat(pretrained, tmp_path):
    hf_dir, _ = pretrained
    with pytest.raises(ValueError, match="has no chat template: --chat true needs a model fine-tuned on conversations"):
        run(str(hf_dir), "hello", max_new_tokens=2, chat=True)
    with pytest.raises(ValueError, match="--system is a message of a conversation: add --chat true"):
        run(str(hf_dir), "hello", max_new_tokens=2, system="be brief")


def test_a_tokenizer_larger_than_the_checkpoint_vocabulary_is_refused(pretrained, tmp_path, corpus):
    hf_dir, conversations = pretrained
    texts = [p.read_text() for p in sorted(corpus.glob("*.py"))]
    larger = tmp_path / "tokenizer.json"
    train_tokenizer(texts, vocab_size=400).save(str(larger))
    config = finetune_overrides(tmp_path, hf_dir, conversations, 2)
    with pytest.raises(ValueError, match=r"has 400 tokens, more than data.vocab_size \(300\)"):
        main(["fit", "--config", str(FINETUNE), "--config", str(config), "--data.tokenizer_path", str(larger)])


def test_a_checkpoint_of_another_shape_is_refused_naming_the_fields(pretrained, tmp_path):
    hf_dir, conversations = pretrained
    config = finetune_overrides(tmp_path, hf_dir, conversations, 2)
    with pytest.raises(ValueError, match=r"another shape than model.config \(num_nextn_predict_layers: 1 in config.json, "
                                         r"0 in model.config\); copy its config.json values into model.config"):
        main(["fit", "--config", str(FINETUNE), "--config", str(config), "--model.config.num_nextn_predict_layers", "0"])


def test_the_worked_example_fine_tunes_the_quick_start_shape():
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]["config"]
    assert yaml.safe_load(FINETUNE.read_text())["model"]["config"] == tiny
