"""FP8 plugin: quantizer and GEMM error bounds against float64, conversion, training, checkpoints."""

from __future__ import annotations

import pytest
import torch
from dsv3_lightning.plugins.fp8 import (
    FP8GroupedExperts,
    FP8Linear,
    FP8Precision,
    FP8Recipe,
    fp8_linear,
    quantize_blocks,
    quantize_rows,
    quantize_tensor,
    quantize_tiles,
    saved_bytes,
)
from dsv3_lightning.plugins.fp8.gemm import scaled_matmul
from dsv3_lightning.plugins.fp8.quant import FP8_DTYPE, e4m3_error_bound
from torch import nn

from dsv3_lightning import preset
from dsv3_lightning.model.moe import GroupedExperts
from dsv3_lightning.module import DSV3LightningModule


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # heavy-ish tails and a few outliers, so that tiles really get different scales
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    x[torch.rand(*shape, generator=g) < 0.01] *= 30
    return x


QUANTIZERS = {
    "tiles": lambda x, pow2: quantize_tiles(x, pow2=pow2),
    "blocks": lambda x, pow2: quantize_blocks(x, pow2=pow2),
    "rows": lambda x, pow2: quantize_rows(x, pow2=pow2),
    "tensor": lambda x, pow2: quantize_tensor(x, pow2=pow2),
}


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_quantizer_error_within_e4m3_bound(kind, pow2):
    x = rand(200, 300)
    q = QUANTIZERS[kind](x.float(), pow2)
    assert q.q.dtype == FP8_DTYPE and q.s.dtype == torch.float32
    K = x.shape[1]
    scale = q.s.double().repeat_interleave(q.block, dim=1)[:, :K]
    err = (q.dequantize(torch.float64)[:, :K] - x).abs()
    bound = e4m3_error_bound(x, scale).double() + 1e-7 * x.abs()  # + the float32 rounding of x itself
    assert (err <= bound).all()
    assert (q.q.float().abs() <= 448).all()
    if pow2:
        assert torch.equal(torch.log2(q.s), torch.log2(q.s).round())


def test_tile_and_block_scales_are_max_abs_over_their_group():
    x = rand(256, 256).float()
    tiles = quantize_tiles(x)
    torch.testing.assert_close(tiles.s, x.abs().unflatten(1, (2, 128)).amax(-1) / 448)
    blocks = quantize_blocks(x)
    expected = x.abs().unflatten(0, (2, 128)).unflatten(-1, (2, 128)).amax(dim=(1, 3)) / 448
    torch.testing.assert_close(blocks.s[::128], expected)


def gemm_bound(a: torch.Tensor, qa, b: torch.Tensor, qb) -> torch.Tensor:
    """Rigorous elementwise bound on |A_q B_qᵀ - A Bᵀ| from the two quantizers' elementwise bounds."""
    K = a.shape[1]
    ea = e4m3_error_bound(a, qa.s.double().repeat_interleave(qa.block, 1)[:, :K]).double()
    eb = e4m3_error_bound(b, qb.s.double().repeat_interleave(qb.block, 1)[:, :K]).double()
    return ea @ b.abs().T + a.abs() @ eb.T + ea @ eb.T


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise", "tensorwise"])
def test_each_gemm_against_float64_within_its_bound(recipe):
    r = FP8Recipe(recipe)
    x, w, dy = rand(96, 320, seed=1), rand(200, 320, seed=2, scale=0.05), rand(96, 200, seed=3)
    operands = {
        "fprop": (x, r.activation, w, r.weight),
        "dgrad": (dy, r.activation, w.T.contiguous(), r.weight),
        "wgrad": (dy.T.contiguous(), r.activation, x.T.contiguous(), r.activation),
    }
    for name, (a, qa_fn, b, qb_fn) in operands.items():
        qa, qb = qa_fn(a.float()), qb_fn(b.float())
        out = scaled_matmul(qa, qb)[: a.shape[0], : b.shape[0]].double()
        ref = a @ b.T
        slack = 1e-5 * (a.abs() @ b.abs().T)  # float32 inputs and accumulation
        assert ((out - ref).abs() <= gemm_bound(a, qa, b, qb) + slack).all(), name
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 0.08, (name, rel)


def test_fp8_linear_gradients_are_the_three_fp8_gemms():
    x = rand(64, 256, seed=4).float().requires_grad_()
    w = (rand(128, 256, seed=5) * 0.05).float().requires_grad_()
    dy = rand(64, 128, seed=6).float()
    r = FP8Recipe()
    fp8_linear(x, w, r).backward(dy)
    xq = r.activation(x.detach())
    dgrad = scaled_matmul(r.activation(dy), r.weight(w.detach().T))
    wgrad = scaled_matmul(r.activation(dy.T), r.activation(xq.dequantize()[:, :256].T))
    torch.testing.assert_close(x.grad, dgrad)
    torch.testing.assert_close(w.grad, wgrad)


def test_scaled_mm_backend_matches_portable_for_rowwise_and_tensorwise():
    x, w = rand(64, 256).float(), (rand(96, 256, seed=1) * 0.05).float()
    for recipe in ("rowwise", "tensorwise"):
        r = FP8Recipe(recipe)
        torch.testing.assert_close(
            fp8_linear(x, w, r, "scaled_mm"), fp8_linear(x, w, r, "torch"), rtol=1e-5, atol=1e-5
        )


def test_saved_activations_are_fp8():
    r = FP8Recipe()
    assert saved_bytes(1024, 7168, r) == 1024 * 7168 + 1024 * 56 * 4  # vs 4 * 1024 * 7168 in float32
    x = torch.randn(8, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fp8_linear(x, w, r)
    assert FP8_DTYPE in {t.dtype for t in saved} and not any(t is x for t in saved)


# ------------------------------------------------------------------------------------------ the plugin
SHAPE = dict(vocab_size=64, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
             v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
             max_position_embeddings=64)


def make_module(**changes):
    torch.manual_seed(0)
    return DSV3LightningModule(preset("tiny", **{**SHAPE, **changes}), warmup_steps=0)


def test_convert_module_swaps_eligible_layers_only():
    module = make_module()
    plugin = FP8Precision()
    plugin.convert_module(module)
    model = module.model
    assert plugin.skipped == ["model.lm_head"]
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    layer0, layer1 = model.model.layers
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert isinstance(getattr(layer1.self_attn, name), FP8Linear), name
    assert isinstance(layer0.mlp.down_proj, FP8Linear) and isinstance(layer1.mlp.shared_experts.up_proj, FP8Linear)
    assert isinstance(layer1.mlp.experts, FP8GroupedExperts)
    assert not isinstance(layer1.mlp.gate, (nn.Linear, FP8Linear))
    assert len(plugin.converted) == 5 * 2 + 3 + 3 + 1  # attention x2, dense MLP, shared expert, experts


def test_converted_model_keeps_state_dict_and_trains_close_to_float32():
    ref, fp8 = make_module(), make_module()
    FP8Precision().convert_module(fp8)
    assert ref.state_dict().keys() == fp8.state_dict().keys()
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0))
    loss_ref, loss_fp8 = ref.model(tokens[:, :-1]).logits, fp8.model(tokens[:, :-1]).logits
    assert ((loss_fp8 - loss_ref).norm() / loss_ref.norm()) < 0.1
    fp8.model(tokens[:, :-1]).logits.square().mean().backward()
    grads = {n: p.grad for n, p in fp8.named_parameters()}
    assert all(g is not None and g.isfinite().all() for g in grads.values())


def test_checkpoint_loads_with_and_without_the_plugin():
    fp8 = make_module()
    FP8Precision().convert_module(fp8)
    plain = make_module()
    plain.load_state_dict(fp8.state_dict())  # master weights stay float32: nothing to convert back
    again = make_module()
    FP8Precision().convert_module(again)
    again.load_state_dict(plain.state_dict())
    for (n, a), (_, b) in zip(plain.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b) and a.dtype == b.dtype, n


def test_grouped_experts_fp8_matches_per_expert_fp8_linear():
    experts = GroupedExperts(3, 128, 128)
    nn.init.normal_(experts.gate_up_proj, std=0.05)
    nn.init.normal_(experts.down_proj, std=0.05)
    fp8 = FP8GroupedExperts.from_experts(experts, FP8Recipe(), "torch")
    counts = torch.tensor([5, 0, 7])
    x = torch.randn(12, 128)
    r = FP8Recipe()
    gate, up = torch.cat([fp8_linear(x[:5], experts.gate_up_proj[0], r), fp8_linear(x[5:], experts.gate_up_proj[2], r)]).chunk(2, -1)
    h = torch.nn.functional.silu(gate) * up
    expected = torch.cat([fp8_linear(h[:5], experts.down_proj[0], r), fp8_linear(h[5:], experts.down_proj[2], r)])
    torch.testing.assert_close(fp8(x, counts), expected)


def test_grouped_experts_fp8_without_tokens_still_backpropagates_to_the_input():
    """An expert-parallel rank whose experts got no token must still run the backward of its dispatch
    all-to-all, which its peers run: the empty output is computed from the input (the 671B-style crash
    was a collective mismatch at the first step where one rank's experts received nothing)."""
    experts = GroupedExperts(2, 128, 128)
    experts.expert_offset = 2
    fp8 = FP8GroupedExperts.from_experts(experts, FP8Recipe(), "torch")
    assert fp8.expert_offset == 2  # a shard's global id of row 0 survives the conversion
    x = torch.randn(4, 128, requires_grad=True)
    received = x[:0] * 2  # what a dispatch delivers when no copy came here: empty, with a graph
    y = fp8(received, torch.tensor([0, 0]))
    assert y.shape == (0, 128) and y.grad_fn is not None
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_unaligned_skip_keeps_layers_in_high_precision():
    module = make_module(qk_rope_head_dim=8)  # kv_a_proj_with_mqa: 64 + 8 = 72 outputs
    plugin = FP8Precision(unaligned="skip")
    with pytest.warns(UserWarning, match="not multiples of 128"):
        plugin.convert_module(module)
    assert any(name.endswith("kv_a_proj_with_mqa") for name in plugin.skipped)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(recipe="int4"), r"recipe \('int4'\) is not a recipe; choose one of blockwise, rowwise, tensorwise"),
        (dict(backend="cuda"), r"backend \('cuda'\) must be one of"),
        (dict(unaligned="crop"), r"unaligned \('crop'\) must be 'pad' or 'skip'"),
        (dict(recipe="blockwise", backend="scaled_mm"), r"scaled_mm' takes one scale per row"),
    ],
)
def test_bad_plugin_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FP8Precision(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_backend_on_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend 'triton' needs a CUDA GPU.*use backend: torch"):
        FP8Precision(backend="triton")


def test_nothing_to_convert_is_an_error():
    with pytest.raises(ValueError, match="no linear layer to convert"):
        FP8Precision(exclude=["*"]).convert_module(make_module())


def test_saved_activation_report_matches_what_autograd_keeps():
    module = make_module()
    plugin = FP8Precision()
    plugin.convert_module(module)
    layer = module.model.model.layers[0].self_attn
    (name, fp8, fp32), = [row for row in plugin.saved_activation_report(10) if row[0].endswith("layers.0.self_attn.o_proj")]
    assert fp32 == 4 * 10 * 64 and fp8 == 10 * 128 + 10 * 4  # 64 inputs padded to one 128-wide tile
    saved = []
    x = torch.randn(10, 64)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer.o_proj(x)
    activation_bytes = sum(t.numel() * t.element_size() for t in saved if t is not layer.o_proj.weight)
    assert activation_bytes == fp8


def test_adamw_bf16_tracks_float32_adamw_and_halves_the_state():
    from dsv3_lightning.plugins.fp8 import AdamWBF16

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 64))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamWBF16([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(20):
        grad = torch.randn(64, 64)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert ((a - b).norm() / (b - 0).norm()) < 1e-2  # bf16 moments: close, not identical
    assert a.dtype == torch.float32
    assert ours.state_bytes() == 2 * 64 * 64 * 2  # two bf16 moments: 4 bytes per parameter, AdamW 8
    with pytest.raises(ValueError, match=r"lr \(-1\)"):
        AdamWBF16([a], lr=-1)


def test_adamw_bf16_resumes_exactly_with_bf16_moments():
    from dsv3_lightning.plugins.fp8 import AdamWBF16

    torch.manual_seed(0)
    grads = [torch.randn(64, 64) for _ in range(6)]
    a = torch.nn.Parameter(torch.randn(64, 64))
    b = torch.nn.Parameter(a.detach().clone())
    straight = AdamWBF16([a], lr=1e-2)
    for grad in grads:
        a.grad = grad.clone()
        straight.step()
    first = AdamWBF16([b], lr=1e-2)
    for grad in grads[:3]:
        b.grad = grad.clone()
        first.step()
    resumed = AdamWBF16([b], lr=1e-2)
    resumed.load_state_dict(first.state_dict())  # torch casts the moments to float32 here
    assert {t.dtype for s in resumed.state.values() for t in s.values() if torch.is_tensor(t)} == {torch.bfloat16}
    for grad in grads[3:]:
        b.grad = grad.clone()
        resumed.step()
    assert torch.equal(a, b)
    assert resumed.state_bytes() == straight.state_bytes()


def test_deepseek_fp8_checkpoint_round_trip(tmp_path):
    import json

    from dsv3_lightning.plugins.fp8 import dequantize_checkpoint, quantize_checkpoint
    from safetensors import safe_open

    from dsv3_lightning import DeepSeekV3

    model = DeepSeekV3(preset("tiny", **{**SHAPE, "hidden_size": 200}))  # 200: edge blocks are cropped
    model.save_pretrained(tmp_path / "plain", max_shard_size=300_000)
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.self_attn.q_a_proj.weight"
    with safe_open(str(tmp_path / "fp8" / index[key]), framework="pt") as f:
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
        assert tuple(f.get_tensor(key + "_scale_inv").shape) == (1, 2)  # [ceil(128/128), ceil(200/128)]
    direct = DeepSeekV3.from_pretrained(tmp_path / "fp8").state_dict()  # dequantized while loading
    dequantize_checkpoint(tmp_path / "fp8", tmp_path / "back", dtype=torch.float32)
    for name, tensor in DeepSeekV3.from_pretrained(tmp_path / "back").state_dict().items():
        assert torch.equal(tensor, direct[name]), name  # the same values either way
    plain, back = read_all(tmp_path / "plain"), read_all(tmp_path / "back")
    assert plain.keys() == back.keys()
    quantized = 0
    for key, ref in plain.items():
        if key.startswith("model.layers.") and ref.dim() == 2 and "mlp.gate." not in key:
            scale = quantize_blocks(ref).s.repeat_interleave(128, 1)[:, : ref.shape[1]]
            assert ((back[key] - ref).abs() <= e4m3_error_bound(ref, scale)).all(), key
            quantized += 1
        else:
            assert torch.equal(back[key], ref), key
    assert quantized > 20


def read_all(path):
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors
