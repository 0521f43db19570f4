"""Shard-first construction's core: init by name, buffers recomputed, materialisation of what is left
on meta, configure_model, and the CLI's switch to a meta build for a shards-first strategy."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from dsv3_lightning import DeepSeekV3, preset
from dsv3_lightning.cli import DSV3CLI, builds_shards_first
from dsv3_lightning.config import ModelConfig
from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.model.init import init_weights_
from dsv3_lightning.model.materialize import materialize_
from dsv3_lightning.model.moe import MoE
from dsv3_lightning.module import DSV3LightningModule, building_on_meta
from dsv3_lightning.plugins.mtp import MultiTokenPrediction

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             num_hidden_layers=3, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, max_position_embeddings=64)


def small(**overrides) -> ModelConfig:
    return preset("tiny", **{**SMALL, **overrides})


def module(on_meta: bool, seed: int = 0, **overrides) -> DSV3LightningModule:
    torch.manual_seed(seed)
    with torch.device("meta") if on_meta else torch.device("cpu"):
        return DSV3LightningModule(small(**overrides), [MultiTokenPrediction(1)])


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, key
        assert torch.equal(a[key], b[key]), key


def test_meta_built_and_materialised_equals_a_normal_build_bitwise():
    normal, meta = module(on_meta=False), module(on_meta=True)
    assert all(t.is_meta for t in meta.model.state_dict().values())
    assert all(t.is_meta for t in meta.heads.state_dict().values())
    meta.configure_model()
    assert_state_equal(normal.state_dict(), meta.state_dict())
    # the non-persistent buffers (RoPE frequencies, router counts) too, and the Parameter kinds
    assert_state_equal(dict(normal.named_buffers()), dict(meta.named_buffers()))
    for (name, p), (_, q) in zip(normal.named_parameters(), meta.named_parameters()):
        assert isinstance(q, nn.Parameter) and q.requires_grad == p.requires_grad, name
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(normal(ids), meta(ids))


def test_seed_everything_decides_the_init():
    a, b, c = (module(on_meta=False, seed=s) for s in (7, 7, 8))
    assert_state_equal(a.state_dict(), b.state_dict())
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)


def test_init_keeps_todays_distributions():
    model = module(on_meta=False).model
    std = model.config.initializer_range
    experts = model.model.layers[1].mlp.experts
    for w in (model.lm_head.weight, experts.gate_up_proj, experts.down_proj, model.routers()[0].weight):
        assert abs(w.std().item() - std) < 0.05 * std and abs(w.mean().item()) < 0.05 * std
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert not model.routers()[0].e_score_correction_bias.any()


def test_an_expert_shard_gets_exactly_the_full_inits_rows():
    torch.manual_seed(0)
    full = DeepSeekV3(small())
    torch.manual_seed(0)
    with torch.device("meta"):
        shard = DeepSeekV3(small())
    for moe in shard.moe_layers():  # what a strategy does on meta: keep rows 4..5, say where they start
        experts = moe.experts
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj[4:6])
        experts.down_proj = nn.Parameter(experts.down_proj[4:6])
        experts.num_experts, experts.expert_offset = 2, 4
    materialize_(shard, "cpu", shard.init_seed, std=shard.config.initializer_range)
    for mine, theirs in zip(shard.moe_layers(), full.moe_layers()):
        assert torch.equal(mine.experts.gate_up_proj, theirs.experts.gate_up_proj[4:6])
        assert torch.equal(mine.experts.down_proj, theirs.experts.down_proj[4:6])
        assert torch.equal(mine.gate.weight, theirs.gate.weight)


def test_released_and_already_materialised_tensors_are_left_alone():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DeepSeekV3(small())
    released = model.model.layers[2].self_attn.o_proj.weight = nn.Parameter(torch.empty(0))  # given back
    on_meta_released = model.model.layers[1].self_attn.o_proj.weight
    on_meta_released.data = on_meta_released.data.new_empty(0)  # released while still on meta
    kept = model.lm_head.weight = nn.Parameter(torch.full((256, 64), 3.0))  # a strategy's own tensor
    done = materialize_(model, "cpu", model.init_seed, std=0.006)
    assert model.model.layers[2].self_attn.o_proj.weight is released and released.numel() == 0
    assert model.model.layers[1].self_attn.o_proj.weight.shape == (0,)
    assert not model.model.layers[1].self_attn.o_proj.weight.is_meta
    assert model.lm_head.weight is kept and bool((kept == 3.0).all())
    assert "lm_head.weight" not in done.allocated
    assert "model.layers.1.self_attn.o_proj.weight" in done.allocated
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def test_a_layers_init_does_not_depend_on_the_other_layers():
    torch.manual_seed(0)
    two = DeepSeekV3(small(num_hidden_layers=2)).state_dict()
    torch.manual_seed(0)
    four = DeepSeekV3(small(num_hidden_layers=4)).state_dict()
    for key in two:
        assert torch.equal(two[key], four[key]), key
    # and visiting tensors in another order, or one at a time, changes nothing
    torch.manual_seed(0)
    model = DeepSeekV3(small(num_hidden_layers=2))
    names = [n for n, _ in model.named_parameters()]
    for name in reversed(names):
        init_weights_(model, model.init_seed, std=model.config.initializer_range, only={name})
    assert_state_equal(two, model.state_dict())


def test_init_from_on_meta_reads_the_kept_tensors_only(tmp_path):
    trained = module(on_meta=False, seed=3)  # a "trained" model and MTP module, saved as the release does
    trained.model.save_pretrained(tmp_path, extra_state=trained.heads[0].hf_state_dict(trained.model))
    config = small(num_nextn_predict_layers=1)  # as the saved config.json says
    torch.manual_seed(0)
    normal = DSV3LightningModule(config, [MultiTokenPrediction(1)], init_from=str(tmp_path))
    torch.manual_seed(0)
    with building_on_meta():
        meta = DSV3LightningModule(config, [MultiTokenPrediction(1)], init_from=str(tmp_path))
    for moe in (m for m in meta.modules() if isinstance(m, MoE)):  # an expert shard (heads too): rows 2..3
        moe.experts.gate_up_proj = nn.Parameter(moe.experts.gate_up_proj[2:4])
        moe.experts.down_proj = nn.Parameter(moe.experts.down_proj[2:4])
        moe.experts.num_experts, moe.experts.expert_offset = 2, 2
    meta.configure_model()
    full, sharded = normal.state_dict(), meta.state_dict()
    assert_state_equal(trained.state_dict(), full)
    for key, tensor in sharded.items():
        stacked = key.endswith(("experts.gate_up_proj", "experts.down_proj"))
        expected = full[key][2:4] if stacked else full[key]
        assert torch.equal(tensor, expected), key


def test_configure_model_leaves_a_normal_module_alone():
    normal = module(on_meta=False)
    params = {n: p for n, p in normal.named_parameters()}
    before = {k: v.clone() for k, v in normal.state_dict().items()}
    normal.configure_model()
    normal.configure_model()
    assert all(p is params[n] for n, p in normal.named_parameters())
    assert_state_equal(before, normal.state_dict())


class ShardsFirstStrategy(SingleDeviceStrategy):
    """What a sharding strategy declares (it would cut the meta model before configure_model)."""

    builds_shards_first = True

    def __init__(self) -> None:
        super().__init__(device=torch.device("cpu"))


def _windows(n: int = 4):
    torch.manual_seed(1)
    return torch.utils.data.DataLoader(torch.randint(0, 256, (n, 18)), batch_size=2)


def test_a_trainer_materialises_a_meta_module_into_the_normal_run():
    """Two optimizer steps under Lightning from a meta build give the weights of a normal build's."""
    final = []
    for on_meta in (False, True):
        m = module(on_meta=on_meta)
        trainer = L.Trainer(strategy=ShardsFirstStrategy(), max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(m, _windows())
        final.append(m.state_dict())
    assert_state_equal(*final)


def test_the_cli_builds_on_meta_for_a_shards_first_strategy_only(tmp_path, plain_argv):
    shape = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
             "q_lora_rank": 16, "kv_lora_rank": 16}
    base = ["--config", str(ROOT / "configs/tiny.yaml"), "--data.data_path", str(tmp_path),
            "--data.vocab_size=300", "--trainer.logger=false", "--trainer.callbacks=[]",
            *(f"--model.config.{key}={value}" for key, value in shape.items())]
    sharded = DSV3CLI(DSV3LightningModule, DSV3DataModule, run=False,
                      args=[*base, f"--trainer.strategy={{class_path: {__name__}.ShardsFirstStrategy}}"])
    assert sharded.model.model.lm_head.weight.is_meta
    assert sharded.model.heads is not None and not sharded.model.val_loss.mean_value.is_meta
    plain = DSV3CLI(DSV3LightningModule, DSV3DataModule, run=False, args=base)
    assert not any(t.is_meta for t in plain.model.state_dict().values())
    assert builds_shards_first(ShardsFirstStrategy()) and not builds_shards_first("ddp")
    assert not builds_shards_first("auto") and not builds_shards_first(None)


def test_building_on_meta_keeps_the_modules_bookkeeping():
    normal = module(on_meta=False)
    torch.manual_seed(0)
    with building_on_meta():
        meta = DSV3LightningModule(small(), [MultiTokenPrediction(1)], recompute_activations=True)
    assert meta.model.lm_head.weight.is_meta and meta.heads[0].layers[0].eh_proj.weight.is_meta
    assert meta.flops_per_token == normal.flops_per_token
    assert meta.model.num_parameters() == normal.model.num_parameters()
    assert all(layer.recompute for layer in meta.model.model.layers)
    assert meta.heads[0].layers[0].recompute


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_the_16b_module_built_on_meta_takes_little_memory():
    values = yaml.safe_load((ROOT / "configs/16B.yaml").read_text())
    config = ModelConfig(vocab_size=values["data"]["vocab_size"], **values["model"]["config"])
    before = _rss_mb()
    with building_on_meta():
        m = DSV3LightningModule(config, [MultiTokenPrediction(1)])
    total, _ = m.model.num_parameters()
    assert total > 15e9  # ~63 GB in float32, had it been materialised
    assert _rss_mb() - before < 300
