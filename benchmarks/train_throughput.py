"""Training throughput against transformers' DeepseekV3ForCausalLM of the same shapes, on CPU.

    python benchmarks/train_throughput.py [--repeats 10] [--batch 4] [--seq 256] [--compile]

Two shapes: "moe-heavy" (hidden 512, 64 routed experts with 6 active + 1 shared, 4 layers, vocabulary
4096) and "small" (configs/small.yaml's model). For each, our DeepSeekV3 and transformers' model built
from the same config (``config_to_hf``) train on the same random batch in float32: forward, cross
entropy, backward, fused AdamW step (the module's default, and transformers Trainer's), interleaved round-robin after two warm-up steps, median of
``--repeats``. Prints tokens/s, our speed over transformers', and the achieved FLOP rate (6 x activated
non-embedding parameters per token, plus attention) as a fraction of a float32 matmul rate measured in
the same run (a 2048 x 2048 x 2048 torch.mm). ``--compile`` adds a third model in the same rotation, a
copy of ours with ``compile_blocks()`` (torch.compile of the attention blocks, norms and dense MLPs;
compiled during the warm-up steps), and its speed over eager.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from interleave import interleaved_medians

from dsv3_lightning import DeepSeekV3, preset
from dsv3_lightning.hf import config_to_hf

SHAPES = {
    "moe-heavy": dict(
        vocab_size=4096, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6,
        n_group=8, topk_group=4, max_position_embeddings=1024,
    ),
    "small": {},
}


def gemm_rate(repeats: int = 5) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / interleaved_medians({"matmul": lambda: a @ b}, repeats)["matmul"]


def flops_per_step(model: DeepSeekV3, batch: int, seq: int) -> float:
    c = model.config
    _, activated = model.num_parameters()
    dense = activated - model.model.embed_tokens.weight.numel()
    attention = 2 * c.num_hidden_layers * c.num_attention_heads * seq * (c.qk_head_dim + c.v_head_dim)  # per token, causal half
    return 3 * batch * seq * (2 * dense + attention)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time ours with compile_blocks()")
    args = parser.parse_args()
    import transformers

    torch.set_num_threads(2)
    rate = gemm_rate()
    print(f"\nfloat32, {torch.get_num_threads()} threads, batch {args.batch} x {args.seq}, median of {args.repeats} "
          f"interleaved steps; float32 matmul rate measured: {rate / 1e9:.1f} GFLOP/s\n")
    compiled = " | ours compiled tokens/s | compiled vs eager" if args.compile else ""
    print(f"| shape | ours tokens/s | transformers tokens/s | ours vs transformers | ours, fraction of matmul rate{compiled} |")
    print("|---|---|---|---|---|" + ("---|---|" if args.compile else ""))
    for name, overrides in SHAPES.items():
        torch.manual_seed(0)
        ours = DeepSeekV3(preset("small", **overrides))
        hf_config = transformers.DeepseekV3Config(**config_to_hf(ours.config, dtype=torch.float32))
        theirs = transformers.DeepseekV3ForCausalLM(hf_config)
        tokens = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq + 1))
        models = {"ours": ours, "transformers": theirs}
        if args.compile:
            models["ours compiled"] = copy.deepcopy(ours)
            models["ours compiled"].compile_blocks()
        optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in models.items()}

        def step(key: str) -> None:
            logits = models[key](tokens[:, :-1]).logits
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            optimizers[key].step()
            optimizers[key].zero_grad()

        medians = interleaved_medians({k: lambda k=k: step(k) for k in models}, args.repeats, warmup=2)
        n = args.batch * args.seq
        ours_s, theirs_s = medians["ours"], medians["transformers"]
        achieved = flops_per_step(ours, args.batch, args.seq) / ours_s
        row = f"| {name} | {n / ours_s:,.0f} | {n / theirs_s:,.0f} | {theirs_s / ours_s:.2f}x | {achieved / rate:.0%} |"
        if args.compile:
            compiled_s = medians["ours compiled"]
            row += f" {n / compiled_s:,.0f} | {ours_s / compiled_s:.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
