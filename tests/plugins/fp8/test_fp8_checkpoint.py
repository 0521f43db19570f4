"""The FP8 checkpoint command (`python -m dsv3_lightning.plugins.fp8.checkpoint`): files with the mode
the umask gives, and DST guarded as `dsv3 convert` guards it (tests/cli/test_convert_overwrite.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dsv3_lightning.plugins.fp8.checkpoint import dequantize_checkpoint, main, quantize_checkpoint
from test_fp8 import SHAPE

from dsv3_lightning import DeepSeekV3, preset
from dsv3_lightning.cli import _enable_logging

COMMAND = r"python -m dsv3_lightning\.plugins\.fp8\.checkpoint"
SHARD = 300_000  # bytes: the tiny model (about 1.5 MB in float32) in several shards


@pytest.fixture(autouse=True)
def _cli():
    """Logging set up as `dsv3` sets it, as in test_convert_overwrite, so caplog sees the first call too."""
    _enable_logging()


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield 0o666 & ~mask
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in root.iterdir()}


@pytest.fixture
def fp8(tmp_path) -> Path:
    """A small DeepSeek FP8 checkpoint in several shards, with a tokenizer file written 0600."""
    torch.manual_seed(0)
    plain = tmp_path / "plain"
    DeepSeekV3(preset("tiny", **SHAPE)).save_pretrained(plain, max_shard_size=SHARD)
    (plain / "tokenizer.json").write_text('{"stands in": "for a tokenizer"}')
    os.chmod(plain / "tokenizer.json", 0o600)
    quantize_checkpoint(plain, tmp_path / "fp8")
    return tmp_path / "fp8"


def test_every_file_written_has_the_umask_mode(fp8, tmp_path) -> None:
    with _umask(0o027) as mode:  # not the usual 022: the mode follows the umask, it is not a constant
        main(["dequantize", str(fp8), str(tmp_path / "back")])
        dequantize_checkpoint(fp8, tmp_path / "direct")  # the function, without the command's guard
        main(["quantize", str(tmp_path / "back"), str(tmp_path / "again")])
    for out in ("back", "direct", "again"):
        modes = _modes(tmp_path / out)
        assert len(modes) > 4 and "tokenizer.json" in modes  # shards, index, config, tokenizer
        assert set(modes.values()) == {mode}, (out, modes)  # safetensors alone writes 0600


def test_a_non_empty_destination_is_refused_without_overwrite(fp8, tmp_path, caplog) -> None:
    out = tmp_path / "back"
    main(["dequantize", str(fp8), str(out)])
    (out / "model-00099-of-00099.safetensors").write_bytes(b"a larger model's shard")
    entries = sorted(p.name for p in out.iterdir())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(
        ValueError,
        match=rf"back: not empty \({len(entries)} entries: {', '.join(entries[:5])} and {len(entries) - 5} more\); "
        rf"{COMMAND} dequantize writes into a new or empty directory\. Pass --overwrite to replace its model "
        r"files, or name another directory",
    ):
        main(["dequantize", str(fp8), str(out), "--dtype", "float32"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    with pytest.raises(ValueError, match=rf"back: not empty .*; {COMMAND} quantize writes into"):
        main(["quantize", str(tmp_path / "plain"), str(out)])

    (out / "notes.txt").write_text("not a model file: kept\n")
    with caplog.at_level(logging.WARNING, logger="dsv3_lightning.convert"):
        main(["dequantize", str(fp8), str(out), "--dtype", "float32", "--overwrite"])
    assert not (out / "model-00099-of-00099.safetensors").exists()  # the stale shard is gone
    assert "removed 1 stale: model-00099-of-00099.safetensors" in caplog.text
    assert "kept 1 other: notes.txt" in caplog.text
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # the new files
    DeepSeekV3.from_pretrained(out)


def test_other_destinations_are_refused(fp8, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"fp8: is SRC itself; name another DST"):
        main(["dequantize", str(fp8), str(fp8), "--overwrite"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file: dequantizing gives a Hugging Face directory; name a directory"):
        main(["dequantize", str(fp8), str(tmp_path / "file"), "--overwrite"])
    with pytest.raises(ValueError, match=r"file: quantizing gives a Hugging Face directory; name a directory"):
        main(["quantize", str(tmp_path / "plain"), str(tmp_path / "file"), "--overwrite"])
    (tmp_path / "empty").mkdir()
    main(["dequantize", str(fp8), str(tmp_path / "empty")])  # an empty directory is no overwrite
    assert (tmp_path / "empty" / "config.json").is_file()


def test_the_refusal_is_the_last_line_of_the_module_command(fp8, tmp_path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"weights")
    result = subprocess.run(
        [sys.executable, "-m", "dsv3_lightning.plugins.fp8.checkpoint", "dequantize", str(fp8), str(tmp_path / "hf")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "hf: not empty (1 entries: model.safetensors)" in last and "Pass --overwrite" in last
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == b"weights"
