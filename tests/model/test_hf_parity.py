"""Parity with Hugging Face transformers, for every family of the architecture it describes.

deepseek_v3 (DeepseekV3ForCausalLM), deepseek_v2 (V2, softmax routing), kimi_k2 (DeepseekV3ForCausalLM
saved under model_type kimi_k2 with Kimi-K2's config differences), kimi_k25 (Kimi_K25ForConditional-
Generation: its text model, the vision tower left out) and glm4_moe_lite (Glm4MoeLiteForCausalLM).
Each case builds a tiny random HF model, perturbs every weight (norms and the selection bias too, so
that a mis-wired one shows), saves it with HF's own save_pretrained and loads it with ours. Then, in
float32: logits, routing decisions, loss and every parameter's gradient must match, our save must load
back into HF with the same logits, save -> load -> save must be bit-exact, and (every family but
kimi_k25, whose vision tower is not written) HF's own files must come back byte for byte.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dsv3_lightning import DeepSeekV3

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    routed_scaling_factor=2.5,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    num_nextn_predict_layers=0,
)
YARN = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
    beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8,
)
# Kimi-K2's config.json differences from DeepSeek-V3 (one group, its scaling factor, rope theta 50000
# and YaRN with beta_fast == beta_slow == 1), at the tiny model's context length
KIMI = dict(
    q_lora_rank=24, n_group=1, topk_group=1, routed_scaling_factor=2.827,
    rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=4.0, original_max_position_embeddings=32,
                         beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
)  # fmt: skip
# GLM-4.7-Flash's: v_head_dim unlike qk_nope_head_dim, one group, rms_norm_eps 1e-5, theta 1e6
GLM = dict(q_lora_rank=24, v_head_dim=24, routed_scaling_factor=1.8, rms_norm_eps=1e-5,
           rope_parameters=dict(rope_type="default", rope_theta=1e6))  # fmt: skip
CASES = {
    "v3-qlora-yarn-groups": ("v3", dict(q_lora_rank=24, n_group=4, topk_group=2, rope_parameters=YARN)),
    "v3-no-qlora": ("v3", dict(q_lora_rank=None, n_group=1, topk_group=1)),
    "v3-bias-groups": ("v3", dict(q_lora_rank=24, n_group=2, topk_group=1, bias=True)),
    "v3-halves-vdim": ("v3", dict(q_lora_rank=24, n_group=2, topk_group=1, rope_interleave=False, v_head_dim=12)),
    "v2-softmax-groups": ("v2", dict(q_lora_rank=None, n_group=2, topk_group=1, topk_method="group_limited_greedy")),
    "v2-softmax-greedy": ("v2", dict(q_lora_rank=24, topk_method="greedy")),
    "kimi-k2": ("kimi_k2", dict(KIMI, bias=True)),
    "kimi-k25-text": ("kimi_k25", dict(KIMI, bias=True)),
    "glm4-moe-lite": ("glm", dict(GLM, bias=True)),
    "glm4-moe-lite-halves-no-qlora": ("glm", dict(GLM, q_lora_rank=None, rope_interleave=False, dense=2)),
}
TINY_VISION = dict(patch_size=14, num_attention_heads=2, num_hidden_layers=1, hidden_size=32,
                   intermediate_size=64, pos_emb_height=4, pos_emb_width=4, pos_emb_time=2)  # fmt: skip
HF_CLASS = {"v3": "DeepseekV3ForCausalLM", "kimi_k2": "DeepseekV3ForCausalLM", "kimi_k25": "DeepseekV3ForCausalLM",
            "v2": "DeepseekV2ForCausalLM", "glm": "Glm4MoeLiteForCausalLM"}  # what our save loads in


def hf_config(kind: str, overrides: dict):
    base = {k: v for k, v in BASE.items() if k not in overrides}
    if kind in ("v3", "kimi_k2"):
        return transformers.DeepseekV3Config(**base, **overrides, norm_topk_prob=True)
    if kind == "v2":
        return transformers.DeepseekV2Config(**base, **overrides, norm_topk_prob=False)
    if kind == "kimi_k25":
        text = dict(base, **overrides, norm_topk_prob=True, model_type="kimi_k2", tie_word_embeddings=False)
        return transformers.Kimi_K25Config(
            text_config=text, vision_config=TINY_VISION, projection_hidden_size=32, tie_word_embeddings=False
        )
    base.pop("first_k_dense_replace")
    dense = overrides.pop("dense", 1)
    types = ["dense"] * dense + ["sparse"] * (BASE["num_hidden_layers"] - dense)
    return transformers.Glm4MoeLiteConfig(**base, **overrides, mlp_layer_types=types, norm_topk_prob=True)


def build_hf_model(kind: str, overrides: dict):
    overrides = dict(overrides)
    bias = overrides.pop("bias", False)
    config = hf_config(kind, overrides)
    cls = {"kimi_k25": transformers.Kimi_K25ForConditionalGeneration, "v2": transformers.DeepseekV2ForCausalLM,
           "glm": transformers.Glm4MoeLiteForCausalLM}.get(kind, transformers.DeepseekV3ForCausalLM)  # fmt: skip
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.set_experts_implementation("eager")  # the per-expert loop: an independent reference
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.05)
        if bias:
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(0.05 * torch.randn_like(buf))
    return model.eval()


def record_routing(model, kind: str) -> list[torch.Tensor]:
    """Hooks every HF router and returns the list that will hold its top-k ids per call."""
    seen = []
    gate_cls = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter
    if kind == "v2":
        gate_cls = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter
    if kind == "glm":
        gate_cls = transformers.models.glm4_moe_lite.modeling_glm4_moe_lite.Glm4MoeLiteTopkRouter
    for module in model.modules():
        if isinstance(module, gate_cls):
            module.register_forward_hook(lambda m, args, out: seen.append(out[2].detach()))
    return seen


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def hf_name(kind: str, name: str) -> str:
    """HF's parameter name for ours: kimi_k25 nests the text model as ``model.language_model``."""
    return name.replace("model.", "model.language_model.", 1) if kind == "kimi_k25" and name.startswith("model.") else name


def text_parameters(kind: str, model) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    if kind == "kimi_k25":  # the vision tower and projector are left out
        params = {k: v for k, v in params.items() if k.startswith(("model.language_model.", "lm_head."))}
    return params


def dump_like_hf(config: dict) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    hf_model = build_hf_model(kind, overrides)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf_model.save_pretrained(path)
    if kind == "kimi_k2":  # Kimi-K2's text model: DeepseekV3ForCausalLM under its own model_type
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(dump_like_hf({**config, "model_type": "kimi_k2"}))
    ours = DeepSeekV3.from_pretrained(path)
    return kind, hf_model, ours, path


def test_config_is_read(pair):
    kind, hf_model, ours, _ = pair
    hf = hf_model.config.get_text_config()
    for name in ("q_lora_rank", "v_head_dim", "qk_nope_head_dim", "routed_scaling_factor", "rms_norm_eps"):
        assert getattr(ours.config, name) == getattr(hf, name), name
    assert ours.config.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.config.rope_interleave == getattr(hf, "rope_interleave", True)
    assert ours.config.scoring_func == ("softmax" if kind == "v2" else "sigmoid")
    dense = hf.mlp_layer_types.count("dense") if kind == "glm" else hf.first_k_dense_replace
    assert ours.config.first_k_dense_replace == dense
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in text_parameters(kind, hf_model).values())


def test_logits_routing_loss_and_gradients_match(pair):
    kind, hf_model, ours, _ = pair
    torch.manual_seed(1)
    ids = torch.randint(0, BASE["vocab_size"], (2, 24))
    hf_routes = record_routing(hf_model, kind)

    hf_out = hf_model(input_ids=ids, labels=ids)
    out = ours(ids)
    assert out.logits.shape == (2, 24, BASE["vocab_size"])
    assert relative_error(out.logits, hf_out.logits) < 1e-5

    ours_routes = [router.last_stats.topk_ids_TK for router in ours.routers()]
    assert len(ours_routes) == len(hf_routes) == BASE["num_hidden_layers"] - ours.config.first_k_dense_replace
    for mine, theirs in zip(ours_routes, hf_routes):
        assert torch.equal(mine.sort(-1).values, theirs.sort(-1).values)

    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, hf_out.loss, rtol=1e-6, atol=0)

    loss.backward()
    hf_out.loss.backward()
    hf_grads = {name: p.grad for name, p in text_parameters(kind, hf_model).items()}
    names = [hf_name(kind, name) for name, _ in ours.named_parameters()]
    assert sorted(names) == sorted(hf_grads)
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        assert relative_error(param.grad, hf_grads[hf_name(kind, name)]) < 1e-5, name
    ours.zero_grad()
    hf_model.zero_grad()


def test_our_save_loads_in_transformers(pair, tmp_path):
    kind, hf_model, ours, _ = pair
    ours.save_pretrained(tmp_path)
    expected_type = {"v3": "deepseek_v3", "v2": "deepseek_v2", "kimi_k2": "kimi_k2", "glm": "glm4_moe_lite",
                     "kimi_k25": hf_model.config.get_text_config().model_type}[kind]  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == expected_type
    if kind == "kimi_k2":  # transformers merges per-expert keys only under the model types it registers
        (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "deepseek_v3"}))
    cls = getattr(transformers, HF_CLASS[kind])
    reloaded = cls.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    reloaded.set_experts_implementation("eager")
    ids = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        assert relative_error(reloaded(input_ids=ids).logits, hf_model(input_ids=ids).logits) < 1e-6


def test_transformers_files_come_back_byte_for_byte(pair, tmp_path):
    """HF's own save -> ours -> our save: the same config.json and safetensors bytes, in the source's
    model_type (kimi_k25 writes its text model only: the vision tower is left out on load)."""
    kind, _, ours, path = pair
    ours.save_pretrained(tmp_path)
    if kind == "kimi_k25":  # the text model's tensors, bit for bit, under the text model's own keys
        from safetensors.torch import load_file

        from dsv3_lightning.hf_families import text_key

        source = {text_key("kimi_k25", k): v for k, v in load_file(path / "model.safetensors").items()}
        written = load_file(tmp_path / "model.safetensors")
        assert written.keys() == {k for k in source if k is not None}
        assert all(torch.equal(t, source[k]) for k, t in written.items())
        return
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).read_bytes() == (path / name).read_bytes(), name


def test_save_load_save_is_bit_exact(pair, tmp_path):
    _, _, ours, _ = pair
    ours.save_pretrained(tmp_path / "a")
    DeepSeekV3.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_sharded_checkpoint_round_trip(pair, tmp_path):
    kind, hf_model, ours, _ = pair
    ours.save_pretrained(tmp_path, max_shard_size=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    again = DeepSeekV3.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    if kind != "kimi_k2":  # (transformers has no weight mapping registered under kimi_k2)
        getattr(transformers, HF_CLASS[kind]).from_pretrained(tmp_path, dtype=torch.float32)  # HF reads the shards
