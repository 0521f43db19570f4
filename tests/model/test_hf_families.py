"""Contracts of the family interop (hf_families.py, hf_checkpoint.py, hf_experts.py) that need no
transformers model: released block-FP8 checkpoints read exactly (scales in other shards, stored dtypes
kept), kimi_k25's vision tower left out with a message, and each refusal's message.

The FP8 checkpoints here are written by hand, as the releases lay them out, not by our FP8 plugin: the
core must read them without it.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3_lightning import DeepSeekV3
from dsv3_lightning.config import ModelConfig
from dsv3_lightning.hf import CheckpointReader, config_from_hf, config_to_hf
from dsv3_lightning.hf_checkpoint import dequantize_checkpoint
from dsv3_lightning.hf_experts import stack_state, unstack
from dsv3_lightning.model.materialize import HFCheckpointSource, materialize_

SHAPE = dict(
    vocab_size=64, hidden_size=160, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=24, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
)  # fmt: skip  hidden 160: a 128-column block and a cropped 32-column one
BLOCK = 128


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's layout by hand: E4M3 values and a float32 scale_inv per 128x128 block (cropped edges)."""
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            scale[i, j] = block.abs().max().clamp_min(1e-12) / 448.0
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dequantization on the whole tensor at once: what block-row streaming must equal bit for bit."""
    rows, cols = q.shape
    return q.float() * scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


@pytest.fixture(scope="module")
def fp8_release(tmp_path_factory):
    """A bf16 model saved as a release is: layer linears in FP8, their scales in the *next* shard,
    the router float32, everything else bf16, and an index that says where each key is."""
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig(**SHAPE))
    plain = tmp_path_factory.mktemp("fp8") / "plain"
    model.save_pretrained(plain)
    tensors = load_file(plain / "model.safetensors")
    path = plain.parent / "release"
    path.mkdir()
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    expected = {}
    for n, (key, tensor) in enumerate(sorted(tensors.items())):
        shard = n % 3
        if key.startswith("model.layers.") and tensor.dim() == 2 and "mlp.gate." not in key:
            q, scale = quantize(tensor)
            shards[shard][key] = q
            shards[(shard + 1) % 3][key + "_scale_inv"] = scale  # another shard than its weight
            expected[key] = reference(q, scale)
        elif "mlp.gate." in key:
            shards[shard][key] = tensor.float()  # the router (and its bias) stays float32
            expected[key] = tensor.float()
        else:
            shards[shard][key] = tensor.to(torch.bfloat16)
            expected[key] = tensor.to(torch.bfloat16)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
                                     "activation_scheme": "dynamic"}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path, expected


def test_fp8_scales_are_found_through_the_index_and_dequantized_exactly(fp8_release):
    path, expected = fp8_release
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.self_attn.q_proj.weight"
    assert index[key] != index[key + "_scale_inv"]  # the case the issue names
    reader = CheckpointReader(path)
    assert key + "_scale_inv" not in reader.weight_map  # scales are not tensors of the model
    quantized = 0
    for name, ref in expected.items():
        got = reader.get(name)
        assert got.dtype == ref.dtype, name  # float32 router, bf16 rest, float32 for dequantized FP8
        assert torch.equal(got, ref), name
        quantized += name + "_scale_inv" in index
    assert quantized >= 10
    model = DeepSeekV3.from_pretrained(path)  # for training: everything in the default float32
    ours = dict(unstack(model.state_dict()))
    for name, ref in expected.items():
        assert torch.equal(ours[name], ref.float()), name


def test_dequantized_checkpoint_keeps_stored_dtypes(fp8_release, tmp_path):
    path, expected = fp8_release
    dequantize_checkpoint(path, tmp_path, dtype=torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [k for k in index if k.endswith("_scale_inv")]
    for name, ref in expected.items():
        with safe_open(str(tmp_path / index[name]), framework="pt") as f:
            got = f.get_tensor(name)
        if "mlp.gate." in name:
            assert got.dtype == torch.float32 and torch.equal(got, ref), name  # not rounded to bf16
        else:
            assert got.dtype == torch.bfloat16 and torch.equal(got, ref.to(torch.bfloat16)), name


@pytest.mark.parametrize("step", [1, 2 * BLOCK * 200, 10**9])  # one block row, two, the whole tensor
def test_dequantization_in_steps_is_bit_exact(monkeypatch, step):
    from dsv3_lightning import hf_checkpoint

    monkeypatch.setattr(hf_checkpoint, "STEP_ELEMENTS", step)
    torch.manual_seed(2)
    q, scale = quantize(torch.randn(300, 200))  # 3 block rows, the last cropped to 44
    assert torch.equal(hf_checkpoint.dequantize_blocks(q, scale, (BLOCK, BLOCK)), reference(q, scale))


def test_fp8_checkpoint_faults_are_named(fp8_release, tmp_path):
    path, _ = fp8_release
    key = "model.layers.1.self_attn.q_proj.weight"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    broken = tmp_path / "missing"
    broken.mkdir()
    for file in path.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    del index["weight_map"][key + "_scale_inv"]  # the index lists no scale for an FP8 weight
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{key} is stored as torch.float8_e4m3fn but {key}_scale_inv is in no shard"):
        DeepSeekV3.from_pretrained(broken)

    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"_scale_inv has shape \(1, 2\) but .* in 64x64 blocks needs \(1, 3\)"):
        CheckpointReader(broken).get("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")

    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantization_config \('awq', 'e4m3'\) is not supported; only DeepSeek's block FP8"):
        DeepSeekV3.from_pretrained(broken)


def test_another_architecture_is_refused_with_the_supported_list():
    with pytest.raises(ValueError, match=(
        r"model_type 'qwen3_moe' is not supported; .* deepseek_v3, deepseek_v2, kimi_k2, kimi_k25, glm4_moe_lite"
    )):  # fmt: skip
        config_from_hf({"model_type": "qwen3_moe"}, source="x/config.json")


def test_glm_layer_pattern_other_than_dense_then_sparse_is_refused():
    hf = dict(config_to_hf(ModelConfig(**SHAPE), dtype=torch.float32, family="glm4_moe_lite"))
    assert hf["mlp_layer_types"] == ["dense", "sparse"] and "first_k_dense_replace" not in hf
    assert config_from_hf(hf) == ModelConfig(**SHAPE)
    hf["mlp_layer_types"] = ["sparse", "dense"]
    with pytest.raises(NotImplementedError, match=r"mlp_layer_types \['sparse', 'dense'\] is not 'dense' layers followed"):
        config_from_hf(hf)


def test_a_family_of_another_router_is_refused_on_save(tmp_path):
    model = DeepSeekV3(ModelConfig(**SHAPE, scoring_func="softmax", norm_topk_prob=False))
    with pytest.raises(ValueError, match=r"model_type 'kimi_k2' has a sigmoid router but model.config.scoring_func is 'softmax'"):
        model.save_pretrained(tmp_path, model_type="kimi_k2")
    with pytest.raises(ValueError, match=r"model_type 'llama' cannot be written; choose one of deepseek_v3"):
        model.save_pretrained(tmp_path, model_type="llama")
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.fixture(scope="module")
def kimi_k25(tmp_path_factory):
    """kimi_k25's layout by hand, as the release has it: the text model under ``language_model.``
    (layers, or ``blocks`` as transformers 5 writes them back), a vision tower and a projector."""
    torch.manual_seed(1)
    model = DeepSeekV3(ModelConfig(**SHAPE))
    text = dict(config_to_hf(model.config, dtype=torch.float32, family="kimi_k2"))
    path = tmp_path_factory.mktemp("k25")
    tensors = {}
    for key, tensor in unstack(model.state_dict()):
        key = key.replace("model.layers.", "model.blocks.") if key.startswith("model.layers.1.") else key
        tensors["language_model." + key] = tensor.contiguous()
    tensors["vision_tower.encoder.blocks.0.wqkv.weight"] = torch.randn(6, 4)
    tensors["mm_projector.proj.0.weight"] = torch.randn(4, 4)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
              "text_config": text, "vision_config": {"model_type": "kimi_k25_vision"}, "tie_word_embeddings": False}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return model, path


def test_kimi_k25_text_model_is_read_and_its_vision_tower_left_out(kimi_k25, tmp_path, caplog):
    model, path = kimi_k25
    with caplog.at_level(logging.WARNING, logger="dsv3_lightning.hf"):
        loaded = DeepSeekV3.from_pretrained(path)
    assert "the vision tower and projector (2 tensor(s)" in caplog.text and "are left out" in caplog.text
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.hf_origin.model_type == "kimi_k2" and len(loaded.hf_origin.left_out) == 2
    with pytest.raises(ValueError, match=r"model_type 'kimi_k25' cannot be written: its vision tower is left out"):
        loaded.save_pretrained(tmp_path, model_type="kimi_k25")
    loaded.save_pretrained(tmp_path)  # the text model, in its own model_type
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "kimi_k2"
    assert not [k for k in load_file(tmp_path / "model.safetensors") if not k.startswith(("model.", "lm_head."))]


def test_materialising_from_kimi_k25_reads_the_prefixed_keys(kimi_k25):
    """The shard-first path (``init_from``) reads through the same reader and stacking adapter."""
    model, path = kimi_k25
    with torch.device("meta"):
        meta = DeepSeekV3(model.config)
    materialize_(meta, "cpu", seed=0, std=0.02, source=HFCheckpointSource(path))
    for (name, a), b in zip(model.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(a, b), name


def test_stacking_adapter_round_trip_and_incomplete_experts():
    model = DeepSeekV3(ModelConfig(**SHAPE))
    state = model.state_dict()
    per_expert = dict(unstack(state))
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in per_expert
    back = stack_state(per_expert)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    del per_expert["model.layers.1.mlp.experts.2.down_proj.weight"]
    with pytest.raises(ValueError, match=r"lacks 'model.layers.1.mlp.experts.2.down_proj.weight'"):
        stack_state(per_expert)


def test_config_values_of_the_family_are_validated():
    with pytest.raises(ValueError, match=r"model.config.rope_interleave \('yes'\) must be true or false"):
        ModelConfig(**SHAPE, rope_interleave="yes")
    with pytest.raises(ValueError, match=r"beta_fast \(1.0\) must be at least beta_slow \(2.0\)"):
        ModelConfig(**SHAPE, rope_scaling=dict(factor=4.0, beta_fast=1.0, beta_slow=2.0))
    kimi = ModelConfig(**SHAPE, rope_scaling=dict(factor=4.0, original_max_position_embeddings=32, beta_fast=1.0, beta_slow=1.0))
    assert kimi.rope_scaling.beta_fast == kimi.rope_scaling.beta_slow  # Kimi-K2's values are accepted


# Kimi-K2-Instruct's config.json (the fields that shape the model; its auto_map and token ids are
# carried along untouched): the legacy rope form, YaRN with beta_fast == beta_slow, 384 experts in one group
KIMI_K2_RELEASE = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 131072,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 64, "num_nextn_predict_layers": 0, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 50000.0, "routed_scaling_factor": 2.827,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 163840,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
}  # fmt: skip


def full_size_configs() -> dict[str, dict]:
    """Each family's full-size config.json: transformers' own defaults (its classes document the
    released models' shapes), and Kimi-K2's release (not a transformers class)."""
    transformers = pytest.importorskip("transformers")
    k25 = transformers.Kimi_K25Config(text_config=dict(KIMI_K2_RELEASE, quantization_config=None), tie_word_embeddings=False)
    saved = dict(dtype="bfloat16")  # what save_pretrained adds to a config (to_dict leaves them None)
    return {
        "deepseek_v3": {**transformers.DeepseekV3Config().to_dict(), **saved, "architectures": ["DeepseekV3ForCausalLM"]},
        "deepseek_v2": {**transformers.DeepseekV2Config(n_routed_experts=64, num_experts_per_tok=6).to_dict(), **saved,
                        "architectures": ["DeepseekV2ForCausalLM"]},
        "glm4_moe_lite": {**transformers.Glm4MoeLiteConfig().to_dict(), **saved, "architectures": ["Glm4MoeLiteForCausalLM"]},
        "kimi_k2": json.loads(json.dumps(KIMI_K2_RELEASE)),
        "kimi_k25": k25.to_dict(),
    }  # fmt: skip


def test_full_size_configs_read_and_write_back_unchanged():
    configs = full_size_configs()
    read = {family: config_from_hf(hf, source=family) for family, hf in configs.items()}
    v3, k2, glm = read["deepseek_v3"], read["kimi_k2"], read["glm4_moe_lite"]
    assert (v3.n_group, v3.topk_group, v3.first_k_dense_replace, v3.routed_scaling_factor) == (8, 4, 3, 2.5)
    assert (k2.n_routed_experts, k2.n_group, k2.routed_scaling_factor, k2.rope_theta) == (384, 1, 2.827, 50000.0)
    assert (k2.rope_scaling.factor, k2.rope_scaling.beta_fast, k2.rope_scaling.beta_slow) == (32.0, 1.0, 1.0)
    assert (glm.v_head_dim, glm.qk_nope_head_dim, glm.first_k_dense_replace, glm.rms_norm_eps) == (256, 192, 1, 1e-5)
    assert read["deepseek_v2"].scoring_func == "softmax" and read["deepseek_v2"].n_group == 1  # greedy
    assert read["kimi_k25"].n_routed_experts == 384  # its text_config
    for family in ("deepseek_v3", "deepseek_v2", "glm4_moe_lite", "kimi_k2"):
        hf = configs[family]
        dtype = getattr(torch, hf.get("torch_dtype") or hf.get("dtype") or "float32")
        back = config_to_hf(read[family], dtype=dtype, family=family, base=hf)
        expected = {k: v for k, v in hf.items() if k != "quantization_config"}  # written dequantized
        assert back == expected, family
    changed = config_to_hf(k2.replace(routed_scaling_factor=3.0), dtype=torch.bfloat16, family="kimi_k2", base=configs["kimi_k2"])
    assert changed["routed_scaling_factor"] == 3.0 and "rope_parameters" not in changed  # the source's legacy form kept
    assert config_from_hf(changed) == k2.replace(routed_scaling_factor=3.0)
