"""Multi-token prediction: targets and loss against a direct computation, seams, checkpoints, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dsv3_lightning.plugins.mtp import MultiTokenPrediction

from dsv3_lightning import DeepSeekV3, preset
from dsv3_lightning.module import DSV3LightningModule

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
             max_position_embeddings=64)


def make(depth: int, **kwargs) -> DSV3LightningModule:
    torch.manual_seed(0)
    heads = [MultiTokenPrediction(depth, **kwargs)] if depth is not None else None
    return DSV3LightningModule(preset("tiny", **SHAPE), heads, warmup_steps=0)


def windows(extra: int, S: int = 12, B: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (B, S + 1 + extra), generator=torch.Generator().manual_seed(1))


def direct_mtp_losses(module: DSV3LightningModule, tokens: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Depth k at position i: input Emb(t[i+k]) with h_{k-1}[i], target t[i+k+1]; one position at a time."""
    model, head = module.model, module.heads[0]
    S = tokens.shape[1] - 1 - depth
    h = model(tokens[:, :S]).hidden_states
    cos, sin = model.rotary(S, h.device)
    losses = []
    for k in range(1, depth + 1):
        layer = head.layers[k - 1]
        emb = torch.stack([model.model.embed_tokens(tokens[:, i + k]) for i in range(S)], dim=1)
        x = layer.eh_proj(torch.cat([layer.enorm(emb), layer.hnorm(h)], -1))
        h = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = model.lm_head(layer.shared_head.norm(h))
        target = torch.stack([tokens[:, i + k + 1] for i in range(S)], dim=1)
        losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten()))
    return losses


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_loss_matches_direct_computation(depth):
    module = make(depth, loss_weight=0.3)
    tokens = windows(depth)
    S = tokens.shape[1] - 1 - depth
    out = module.model(tokens[:, :S])
    head_out = module.heads[0](out.hidden_states, module.read_batch(tokens), module.model, stage="train", step=0)
    expected = direct_mtp_losses(module, tokens, depth)
    torch.testing.assert_close(head_out.loss, 0.3 / depth * torch.stack(expected).sum())
    for k, loss in enumerate(expected, start=1):
        torch.testing.assert_close(head_out.logs[f"mtp_loss/depth_{k}"], loss)


def test_depth_zero_is_no_mtp():
    plain, zero = make(None), make(0)
    tokens = windows(0)
    torch.testing.assert_close(plain.training_step(tokens, 0), zero.training_step(tokens, 0))
    assert sum(p.numel() for p in zero.heads.parameters()) == 0


def test_main_val_loss_is_unchanged_by_the_head():
    plain, mtp = make(None), make(1)
    mtp.model.load_state_dict(plain.model.state_dict())
    tokens = windows(1)
    plain._evaluate(tokens[:, :-1], "val")
    mtp._evaluate(tokens, "val")
    torch.testing.assert_close(plain.val_loss.compute(), mtp.val_loss.compute())


def test_gradients_reach_the_shared_embedding_and_head():
    module = make(2)
    tokens = windows(2) % 32
    S = tokens.shape[1] - 3
    tokens[:, S:] = 63  # a token only the MTP modules read as input (depth 2 embeds t[i+2] up to t[S+1])
    out = module.model(tokens[:, :S])
    loss = module.heads[0](out.hidden_states, module.read_batch(tokens), module.model, stage="train", step=0).loss
    emb, head = torch.autograd.grad(loss, [module.model.model.embed_tokens.weight, module.model.lm_head.weight])
    assert emb[63].abs().sum() > 0  # reached through the MTP input path, not the trunk
    assert head.abs().sum() > 0


def test_loss_weight_schedule():
    head = MultiTokenPrediction(1, 0.3, later_loss_weight=0.1, switch_at_step=100)
    assert head.current_weight(99) == 0.3 and head.current_weight(100) == 0.1


def test_hugging_face_layout_round_trip(tmp_path):
    module = make(2)
    model, head = module.model, module.heads[0]
    model.save_pretrained(tmp_path, extra_state=head.hf_state_dict(model))
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.2.eh_proj.weight" in keys and "model.layers.3.shared_head.norm.weight" in keys
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in keys and "model.layers.3.embed_tokens.weight" in keys
    loaded = DeepSeekV3.from_pretrained(tmp_path)
    again = MultiTokenPrediction(2)
    again.attach(loaded)  # picks the modules up from the checkpoint
    for (name, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_without_mtp_is_a_clear_error(tmp_path):
    module = make(1)
    model, head = module.model, module.heads[0]
    model.save_pretrained(tmp_path, extra_state=head.hf_state_dict(model))
    with pytest.raises(ValueError, match=r"no MTP module 2 .*lower model.heads\[MultiTokenPrediction\].depth"):
        MultiTokenPrediction(2).attach(DeepSeekV3.from_pretrained(tmp_path))


def test_errors():
    with pytest.raises(ValueError, match=r"depth \(-1\) must be >= 0"):
        MultiTokenPrediction(-1)
    module = make(2)
    tokens = windows(1)  # one extra token where depth 2 needs two
    hidden = module.model(tokens[:, :12]).hidden_states
    with pytest.raises(ValueError, match="too short for MTP depth 2: set data.extra_tokens to 2"):
        module.heads[0](hidden, module.read_batch(tokens), module.model, stage="train", step=0)


def test_fit_from_yaml_with_mtp(tmp_path, monkeypatch):
    """``model.heads`` and ``data.extra_tokens`` from YAML: a short fit logs the MTP losses."""
    import csv
    import shutil
    import sysconfig
    from pathlib import Path

    from dsv3_lightning.cli import main

    monkeypatch.setattr("sys.argv", ["dsv3"])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("colorsys.py", "bisect.py", "glob.py"):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, corpus / name)
    config = tmp_path / "mtp.yaml"
    config.write_text(f"""
trainer:
  max_steps: 2
  val_check_interval: 2
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {tmp_path}, name: run}}
model:
  config: {{hidden_size: 32, intermediate_size: 48, moe_intermediate_size: 16, num_hidden_layers: 2,
           num_attention_heads: 2, q_lora_rank: 16, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 4,
           v_head_dim: 8, n_routed_experts: 8, num_experts_per_tok: 2, n_group: 4, topk_group: 2,
           max_position_embeddings: 64}}
  heads:
    - class_path: dsv3_lightning.plugins.mtp.MultiTokenPrediction
      init_args: {{depth: 2, loss_weight: 0.3}}
data: {{data_path: {corpus}, cache_dir: {tmp_path / "cache"}, vocab_size: 300, seq_len: 16, batch_size: 2,
       extra_tokens: 2}}
""")
    root = Path(__file__).resolve().parents[3]
    main(["fit", "--config", str(root / "configs/tiny.yaml"), "--config", str(config)])
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    assert any(r.get("train/mtp_loss/depth_2") for r in rows)
    assert any(r.get("val/mtp_accuracy/depth_1") for r in rows) and any(r.get("val/loss") for r in rows)


def reference_speculative(model, mtp, ids, max_new_tokens):
    """The same algorithm with full uncached forwards: the drafts and acceptances to match."""
    proposed, accepted = [0] * mtp.depth, [0] * mtp.depth
    target = ids.shape[1] + max_new_tokens
    ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)  # t_0..t_T
    while ids.shape[1] < target:
        T = ids.shape[1] - 1
        seq, h = ids, model(ids[:, :T]).hidden_states
        cos, sin = model.rotary(T, ids.device)
        for k, layer in enumerate(mtp.layers, start=1):
            h = layer(h, model.embed(seq[:, k : k + T]), cos, sin)
            seq = torch.cat([seq, model.lm_head(layer.shared_head.norm(h[:, -1:])).argmax(-1)], dim=1)
        verify = model(seq).logits[:, T:].argmax(-1)
        n = 0
        for k in range(1, mtp.depth + 1):
            proposed[k - 1] += 1
            if seq[0, T + k] != verify[0, k - 1]:
                break
            accepted[k - 1] += 1
            n += 1
        ids = torch.cat([seq[:, : T + 1 + n], verify[:, n : n + 1]], dim=1)[:, :target]
    return ids, proposed, accepted


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cached_speculative_decoding_matches_greedy_and_the_uncached_algorithm(depth):
    """Only tokens 0 and 1 can win, and the main model alternates them (its state is mostly the current
    token's embedding): the MTP drafts are then right at some depths and wrong at others, so
    acceptance, rejection and the caches' roll-back are all exercised."""
    from dsv3_lightning.plugins.mtp import speculative_generate

    from dsv3_lightning.generation import generate

    module = make(depth)
    module.eval()
    with torch.no_grad():
        embedding, w = module.model.model.embed_tokens.weight, module.model.lm_head.weight
        w.zero_()
        w[0] = embedding[1] - embedding[0]
        w[1] = -w[0]
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    fast, stats = speculative_generate(module.model, module.heads[0], prompt, 24)
    assert torch.equal(fast, generate(module.model, prompt, 24))
    with torch.no_grad():
        ref, proposed, accepted = reference_speculative(module.model, module.heads[0], prompt, 24)
    assert torch.equal(fast, ref)
    assert (stats.proposed, stats.accepted) == (proposed, accepted)
    assert sum(accepted) > 0 and (depth == 1 or sum(accepted) < sum(proposed))
    assert stats.rounds == stats.proposed[0]


def test_speculative_on_random_weights_equals_plain_greedy():
    from dsv3_lightning.plugins.mtp import speculative_generate

    from dsv3_lightning.generation import generate

    module = make(2)
    module.eval()
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    fast, stats = speculative_generate(module.model, module.heads[0], prompt, 20)
    assert torch.equal(fast, generate(module.model, prompt, 20))
    assert sum(stats.proposed) > 0 and len(stats.acceptance()) == 2


def test_speculative_accepts_perfect_drafts():
    """With a zero output matrix every head (main and MTP, which share it) predicts token 0, so every
    draft agrees with the main model and is accepted: the acceptance bookkeeping reaches 1.0."""
    from dsv3_lightning.plugins.mtp import speculative_generate

    from dsv3_lightning.generation import generate

    module = make(1)
    module.eval()
    with torch.no_grad():
        module.model.lm_head.weight.zero_()
    prompt = torch.full((1, 4), 7)
    plain = generate(module.model, prompt, 9)
    fast, stats = speculative_generate(module.model, module.heads[0], prompt, 9)
    assert torch.equal(fast, plain)
    assert stats.acceptance()[0] == 1.0 and torch.all(fast[0, 4:] == 0)
    assert stats.proposed == [4]  # 9 tokens: the prefill's token, then 4 rounds of (accepted draft, bonus)


def test_balancing_callbacks_also_balance_the_mtp_modules_routers():
    import lightning as L
    from dsv3_lightning.plugins.load_balancing import AuxLossFreeBalancing, ExpertLoadMonitor
    from torch.utils.data import DataLoader

    module = make(1)
    monitor = ExpertLoadMonitor()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[AuxLossFreeBalancing(0.01), monitor])
    trainer.fit(module, DataLoader(list(windows(1)), batch_size=3))
    mtp_router = module.heads[0].layers[0].mlp.gate
    assert mtp_router in monitor.routers and len(monitor.routers) == len(module.model.routers()) + 1
    assert mtp_router.e_score_correction_bias.abs().sum() > 0  # moved by the bias update
