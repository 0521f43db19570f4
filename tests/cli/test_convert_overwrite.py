"""`dsv3 convert` into an existing DST: refused without --overwrite; with it, every replaced and stale
file named, no stale shard or tokenizer left, and every file with the mode the umask gives."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3_lightning import DeepSeekV3, preset
from dsv3_lightning.cli import _enable_logging, main
from dsv3_lightning.module import DSV3LightningModule

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=32)
SHARD = 20_000  # bytes: the tiny model (about 95 KB in float32) in several shards


@pytest.fixture(autouse=True)
def _cli(plain_argv):
    """Logging set up as `dsv3` sets it (its own handler, not propagating) before the test, so that
    pytest's caplog, which listens on non-propagating loggers, sees the records of the first call too."""
    _enable_logging()


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield 0o666 & ~mask
    finally:
        os.umask(old)


def _ckpt(path: Path, *, seed: int, tokenizer: str | None) -> Path:
    torch.manual_seed(seed)
    module = DSV3LightningModule(preset("tiny", **SHAPE), [])
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    if tokenizer is not None:
        checkpoint["DSV3DataModule"] = {"tokenizer_json": tokenizer, "vocab_size": 64}
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def ckpts(tmp_path) -> tuple[Path, Path]:
    """Two checkpoints of different weights: the first carries a tokenizer, the second none."""
    return (_ckpt(tmp_path / "a.ckpt", seed=0, tokenizer='{"stands in": "for a tokenizer"}'),
            _ckpt(tmp_path / "b.ckpt", seed=1, tokenizer=None))


def _modes(root: Path) -> dict[str, int]:
    paths = root.iterdir() if root.is_dir() else [root]
    return {p.name: p.stat().st_mode & 0o777 for p in paths}


def test_a_non_empty_directory_is_refused_without_overwrite(ckpts, tmp_path) -> None:
    a, _ = ckpts
    hf = tmp_path / "hf"
    main(["convert", str(a), str(hf), "--max_shard_size", str(SHARD)])
    entries = sorted(p.name for p in hf.iterdir())
    assert len(entries) > 5  # config, index, tokenizer and several shards
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    with pytest.raises(
        ValueError,
        match=rf"hf: not empty \({len(entries)} entries: {', '.join(entries[:5])} and {len(entries) - 5} more\); "
        r"dsv3 convert writes into a new or empty directory\. Pass --overwrite to replace its model files, "
        r"or name another directory",
    ):
        main(["convert", str(a), str(hf)])
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before  # nothing touched
    other = tmp_path / "notes_only"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    with pytest.raises(ValueError, match=r"notes_only: not empty \(1 entries: notes\.txt\)"):
        main(["convert", str(a), str(other)])
    (tmp_path / "empty").mkdir()
    main(["convert", str(a), str(tmp_path / "empty")])  # an empty directory is no overwrite
    assert (tmp_path / "empty" / "config.json").is_file()


def test_overwrite_names_what_it_replaced_removes_stale_files_and_keeps_the_mode(ckpts, tmp_path, caplog) -> None:
    a, b = ckpts
    hf = tmp_path / "hf"
    with _umask(0o027) as mode:  # not the usual 022: the mode follows the umask, it is not a constant
        main(["convert", str(a), str(hf), "--max_shard_size", str(SHARD)])
        old_shards = sorted(p.name for p in hf.glob("model-*.safetensors"))
        (hf / "notes.txt").write_text("not a model file: kept\n")
        assert set(_modes(hf).values()) == {mode}  # safetensors alone writes its shards 0600
        with caplog.at_level(logging.WARNING, logger="dsv3_lightning.convert"):
            main(["convert", str(b), str(hf), "--max_shard_size", str(4 * SHARD), "--overwrite"])
        assert set(_modes(hf).values()) == {mode}, _modes(hf)
    new_shards = sorted(p.name for p in hf.glob("model-*.safetensors"))
    assert len(new_shards) < len(old_shards) and not set(old_shards) & set(new_shards)
    assert sorted(p.name for p in hf.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", "notes.txt", *new_shards]
    )  # no stale shard, and no tokenizer.json: b.ckpt carries none, a's would be read as its tokenizer
    stale = sorted([*old_shards, "tokenizer.json"])
    (message,) = [r.getMessage() for r in caplog.records if "--overwrite" in r.getMessage()]
    assert message.startswith(f"dsv3 convert --overwrite {hf}: replaced 2 file(s): ")
    assert "config.json" in message and "model.safetensors.index.json" in message
    assert f"; removed {len(stale)} stale: {', '.join(stale[:5])}" in message
    assert message.endswith("; kept 1 other: notes.txt")
    exported = DeepSeekV3.from_pretrained(hf).state_dict()
    original = torch.load(b, weights_only=False)["state_dict"]
    for key, tensor in exported.items():
        torch.testing.assert_close(tensor, original[f"model.{key}"], rtol=0, atol=0)


def test_a_ckpt_is_not_overwritten_without_overwrite(ckpts, tmp_path, caplog) -> None:
    a, _ = ckpts
    hf, back = tmp_path / "hf", tmp_path / "back.ckpt"
    main(["convert", str(a), str(hf)])
    back.write_bytes(b"an older checkpoint")
    with pytest.raises(ValueError, match=r"back\.ckpt: exists; pass --overwrite to replace it, or name another "
                                         r"\.ckpt file"):
        main(["convert", str(hf), str(back)])
    assert back.read_bytes() == b"an older checkpoint"
    with _umask(0o002) as mode, caplog.at_level(logging.WARNING, logger="dsv3_lightning.convert"):
        main(["convert", str(hf), str(back), "--overwrite"])
    assert f"dsv3 convert --overwrite {back}: replaced 1 file(s): back.ckpt" in caplog.text
    assert _modes(back) == {"back.ckpt": mode}
    assert "state_dict" in torch.load(back, weights_only=False)


def test_other_destinations_are_refused(ckpts, tmp_path) -> None:
    a, _ = ckpts
    hf = tmp_path / "hf"
    main(["convert", str(a), str(hf)])
    with pytest.raises(ValueError, match=r"hf: is SRC itself; name another DST"):
        main(["convert", str(hf), str(hf), "--overwrite"])
    with pytest.raises(ValueError, match=r"b\.ckpt: converting a \.ckpt gives a Hugging Face directory; name a "
                                         r"directory"):
        main(["convert", str(a), str(tmp_path / "b.ckpt"), "--overwrite"])  # an existing file, not a directory
    (tmp_path / "dir.ckpt").mkdir()
    with pytest.raises(ValueError, match=r"dir\.ckpt: converting a Hugging Face directory gives a Lightning "
                                         r"checkpoint; name a \.ckpt file"):
        main(["convert", str(hf), str(tmp_path / "dir.ckpt"), "--overwrite"])


def test_a_failed_overwrite_keeps_the_files_it_was_replacing(ckpts, tmp_path, monkeypatch, caplog) -> None:
    a, _ = ckpts
    hf = tmp_path / "hf"
    main(["convert", str(a), str(hf)])
    before = {p.name: p.read_bytes() for p in hf.iterdir()}

    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr("dsv3_lightning.convert._ckpt_to_hf", fail)
    with caplog.at_level(logging.ERROR, logger="dsv3_lightning.convert"), pytest.raises(RuntimeError):
        main(["convert", str(a), str(hf), "--overwrite"])
    (aside,) = hf.glob(".dsv3-convert-replaced-*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before
    assert f"dsv3 convert {hf} failed: the model files it was replacing are in {aside}" in caplog.text


def test_dequantizing_into_a_directory_gives_the_umask_mode(ckpts, tmp_path) -> None:
    """The FP8 plugin writes with safetensors (0600) and no overwrite guard of its own: convert adds both."""
    from dsv3_lightning.plugins.fp8.checkpoint import quantize_checkpoint

    a, _ = ckpts
    main(["convert", str(a), str(tmp_path / "hf")])
    quantize_checkpoint(tmp_path / "hf", tmp_path / "fp8")
    out = tmp_path / "dequantized"
    with _umask(0o022) as mode:
        main(["convert", str(tmp_path / "fp8"), str(out)])
        assert set(_modes(out).values()) == {mode}, _modes(out)
    with pytest.raises(ValueError, match=r"dequantized: not empty"):
        main(["convert", str(tmp_path / "fp8"), str(out)])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file: dequantizing gives a Hugging Face directory; name a directory"):
        main(["convert", str(tmp_path / "fp8"), str(tmp_path / "file"), "--overwrite"])


def test_save_pretrained_writes_the_umask_mode_and_names_stale_shards(tmp_path, caplog) -> None:
    model = DeepSeekV3(preset("tiny", **SHAPE))
    with _umask(0o077) as private, _umask(0o022) as mode:
        assert private == 0o600
        model.save_pretrained(tmp_path / "hf", max_shard_size=SHARD)
    assert set(_modes(tmp_path / "hf").values()) == {mode}
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    with caplog.at_level(logging.INFO, logger="dsv3_lightning.hf"):
        model.save_pretrained(tmp_path / "hf")  # one file now: the shards and the index are stale
    stale = ", ".join(sorted([*shards, "model.safetensors.index.json"]))
    assert f"{tmp_path / 'hf'}: removed {len(shards) + 1} stale weight file(s): {stale}" in caplog.text


def test_the_refusal_is_the_last_line_the_user_sees(ckpts, tmp_path) -> None:
    a, _ = ckpts
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"weights")
    result = subprocess.run([sys.executable, "-m", "dsv3_lightning.cli", "convert", str(a), str(tmp_path / "hf")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "hf: not empty (1 entries: model.safetensors)" in last  # a traceback ends in "ValueError: <it>"
    assert "Pass --overwrite" in last
