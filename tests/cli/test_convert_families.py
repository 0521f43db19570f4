"""``dsv3 convert`` across the family (issue 19): a released block-FP8 directory straight to a .ckpt
(dequantized while streaming, scales in other shards), a .ckpt written as another family
(``--model_type glm4_moe_lite``) that transformers loads with the same logits, and the refusal of
``--model_type`` where it cannot apply."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3_lightning import DeepSeekV3
from dsv3_lightning.config import ModelConfig
from dsv3_lightning.convert import main
from dsv3_lightning.loading import load_trained

SHAPE = dict(
    vocab_size=64, hidden_size=160, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=24, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    routed_scaling_factor=1.8, rms_norm_eps=1e-5,
)  # fmt: skip


def write_fp8_release(model: DeepSeekV3, path) -> None:
    """Layer linears as E4M3 with one float32 scale per 128x128 block, each scale in the shard after
    its weight's (as the releases split them), the rest bf16, an index that says where."""
    model.save_pretrained(path / "plain")
    tensors = load_file(path / "plain" / "model.safetensors")
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for n, (key, w) in enumerate(sorted(tensors.items())):
        if key.startswith("model.layers.") and w.dim() == 2 and "mlp.gate." not in key:
            rows, cols = w.shape
            pad = torch.zeros(-(-rows // 128) * 128, -(-cols // 128) * 128)
            pad[:rows, :cols] = w
            blocks = pad.unflatten(0, (-1, 128)).unflatten(2, (-1, 128))  # [R, 128, C, 128]
            scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
            q = (blocks / scale[:, None, :, None]).flatten(2, 3).flatten(0, 1)[:rows, :cols]
            shards[n % 2][key] = q.to(torch.float8_e4m3fn)
            shards[(n + 1) % 2][key + "_scale_inv"] = scale
        else:
            shards[n % 2][key] = w.to(torch.bfloat16) if "mlp.gate." not in key else w
    release = path / "release"
    release.mkdir()
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, str(release / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (release / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((path / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (release / "config.json").write_text(json.dumps(config))


def test_fp8_release_to_ckpt_and_out_as_another_family(tmp_path):
    torch.manual_seed(0)
    write_fp8_release(DeepSeekV3(ModelConfig(**SHAPE)), tmp_path)
    main([str(tmp_path / "release"), str(tmp_path / "model.ckpt")])  # FP8 -> .ckpt, dequantized on the way
    trained = load_trained(tmp_path / "model.ckpt").model
    direct = DeepSeekV3.from_pretrained(tmp_path / "release")
    for (name, a), b in zip(direct.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b.to(a.dtype)), name
    weight = "model.layers.1.self_attn.q_b_proj.weight"
    plain = DeepSeekV3.from_pretrained(tmp_path / "plain").state_dict()[weight]
    assert not torch.equal(direct.state_dict()[weight], plain)  # really went through FP8 ...
    assert (direct.state_dict()[weight] - plain).abs().max() <= plain.abs().max() / 8  # ... and back

    main([str(tmp_path / "model.ckpt"), str(tmp_path / "glm"), "--model_type", "glm4_moe_lite"])
    config = json.loads((tmp_path / "glm" / "config.json").read_text())
    assert config["model_type"] == "glm4_moe_lite" and config["mlp_layer_types"] == ["dense", "sparse"]
    transformers = pytest.importorskip("transformers")
    hf = transformers.Glm4MoeLiteForCausalLM.from_pretrained(tmp_path / "glm", dtype=torch.float32).eval()
    hf.set_experts_implementation("eager")
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 12))
    with torch.no_grad():
        ref, ours = hf(input_ids=ids).logits, trained.float()(ids).logits
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_model_type_is_refused_for_a_hugging_face_source(tmp_path):
    DeepSeekV3(ModelConfig(**SHAPE)).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"--model_type kimi_k2: applies to a Lightning checkpoint .* already a Hugging Face"):
        main([str(tmp_path / "hf"), str(tmp_path / "x.ckpt"), "--model_type", "kimi_k2"])
