"""Bad checkpoints fail loudly, naming the file and the fix; MTP tensors are kept, not dropped."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3_lightning import DeepSeekV3, preset

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=32)


@pytest.fixture
def saved(tmp_path):
    model = DeepSeekV3(preset("tiny", **SHAPE))
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        DeepSeekV3.from_pretrained(tmp_path / "nope")


def test_missing_config(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        DeepSeekV3.from_pretrained(path)


def test_other_model_type(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported.*deepseek_v3"):
        DeepSeekV3.from_pretrained(path)


def test_truncated_safetensors(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors.*(unreadable|corrupt)"):
        DeepSeekV3.from_pretrained(path)


def test_garbage_config(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DeepSeekV3.from_pretrained(path)


def test_shape_mismatch_is_reported(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["kv_lora_rank"] = 8
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch.*kv_a_proj_with_mqa"):
        DeepSeekV3.from_pretrained(path)


def test_mtp_layers_are_kept_and_written_back(saved, tmp_path, caplog):
    model, path = saved
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = torch.randn(32, 64)  # layer N = the first MTP module
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        loaded = DeepSeekV3.from_pretrained(path)
    assert "multi-token-prediction" in caplog.text
    assert loaded.hf_origin.extra_keys == ("model.layers.2.eh_proj.weight",)  # listed, not held
    assert torch.equal(loaded.hf_origin.read_extra()["model.layers.2.eh_proj.weight"], tensors["model.layers.2.eh_proj.weight"])
    loaded.save_pretrained(path)  # over its own source: the MTP tensors are read before anything is written
    again = load_file(path / "model.safetensors")
    assert torch.equal(again["model.layers.2.eh_proj.weight"], tensors["model.layers.2.eh_proj.weight"])


def test_interrupted_save_keeps_previous_checkpoint(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
