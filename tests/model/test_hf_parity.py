"""Parity with Hugging Face transformers' DeepseekV3ForCausalLM (and V2 for softmax routing).

Each case builds a tiny random HF model, perturbs every weight (norms and the selection bias too, so
that a mis-wired one shows), saves it with HF's own save_pretrained and loads it with ours. Then, in
float32: logits, routing decisions, loss and every parameter's gradient must match, our save must load
back into HF with the same logits, and save -> load -> save must be bit-exact.
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
CASES = {
    "v3-qlora-yarn-groups": ("v3", dict(q_lora_rank=24, n_group=4, topk_group=2, rope_parameters=YARN)),
    "v3-no-qlora": ("v3", dict(q_lora_rank=None, n_group=1, topk_group=1)),
    "v3-bias-groups": ("v3", dict(q_lora_rank=24, n_group=2, topk_group=1, bias=True)),
    "v2-softmax-groups": ("v2", dict(q_lora_rank=None, n_group=2, topk_group=1, topk_method="group_limited_greedy")),
    "v2-softmax-greedy": ("v2", dict(q_lora_rank=24, topk_method="greedy")),
}


def build_hf_model(kind: str, overrides: dict):
    overrides = dict(overrides)
    bias = overrides.pop("bias", False)
    if kind == "v3":
        config = transformers.DeepseekV3Config(**BASE, **overrides, norm_topk_prob=True)
        cls = transformers.DeepseekV3ForCausalLM
    else:
        config = transformers.DeepseekV2Config(**BASE, **overrides, norm_topk_prob=False)
        cls = transformers.DeepseekV2ForCausalLM
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
    for module in model.modules():
        if isinstance(module, gate_cls):
            module.register_forward_hook(lambda m, args, out: seen.append(out[2].detach()))
    return seen


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    hf_model = build_hf_model(kind, overrides)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf_model.save_pretrained(path)
    ours = DeepSeekV3.from_pretrained(path)
    return kind, hf_model, ours, path


def test_config_is_read(pair):
    kind, hf_model, ours, _ = pair
    hf = hf_model.config
    assert ours.config.q_lora_rank == hf.q_lora_rank
    assert ours.config.scoring_func == ("sigmoid" if kind == "v3" else "softmax")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf_model.parameters())


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
    assert len(ours_routes) == len(hf_routes) == BASE["num_hidden_layers"] - BASE["first_k_dense_replace"]
    for mine, theirs in zip(ours_routes, hf_routes):
        assert torch.equal(mine.sort(-1).values, theirs.sort(-1).values)

    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, hf_out.loss, rtol=1e-6, atol=0)

    loss.backward()
    hf_out.loss.backward()
    hf_grads = {name: p.grad for name, p in hf_model.named_parameters()}
    names = [name for name, _ in ours.named_parameters()]
    assert sorted(names) == sorted(hf_grads)
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        assert relative_error(param.grad, hf_grads[name]) < 1e-5, name
    ours.zero_grad()
    hf_model.zero_grad()


def test_our_save_loads_in_transformers(pair, tmp_path):
    kind, hf_model, ours, _ = pair
    ours.save_pretrained(tmp_path)
    cls = transformers.DeepseekV3ForCausalLM if kind == "v3" else transformers.DeepseekV2ForCausalLM
    reloaded = cls.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    reloaded.set_experts_implementation("eager")
    ids = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        assert relative_error(reloaded(input_ids=ids).logits, hf_model(input_ids=ids).logits) < 1e-6


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
    cls = transformers.DeepseekV3ForCausalLM if kind == "v3" else transformers.DeepseekV2ForCausalLM
    cls.from_pretrained(tmp_path, dtype=torch.float32)  # transformers reads the sharded layout too
