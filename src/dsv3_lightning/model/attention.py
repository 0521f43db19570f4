"""Multi-head Latent Attention (MLA), SPEC.md §3.1 (paper eqs 1-11), in the released module names.

Shapes (V3 sizes in brackets): B batch, S sequence, D hidden [7168], H heads [128], Cq = q_lora_rank
[1536], Ckv = kv_lora_rank [512], N = qk_nope_head_dim [128], R = qk_rope_head_dim [64],
V = v_head_dim [128].

    queries:  c^Q = q_a_layernorm(q_a_proj(x))            [B, S, Cq]   (or no compression: q_proj)
              q   = q_b_proj(c^Q) -> [B, S, H, N + R]       each head's rows are [nope | rope]
    keys/values:
              [c^KV ; k~^R] = kv_a_proj_with_mqa(x)        [B, S, Ckv + R]
              k^R = RoPE(k~^R)                              ONE rope key shared by every head (MQA-like)
              c^KV = kv_a_layernorm(c^KV)
              [k^C ; v] = kv_b_proj(c^KV) -> [B, S, H, N + V]
    attention on q = [q^C ; RoPE(q^R)], k = [k^C ; k^R] with scale 1/√(N+R) (× mscale² under YaRN),
    causal, through ``scaled_dot_product_attention``; then o_proj: H·V -> D.

The latent norms use eps 1e-6 whatever ``rms_norm_eps`` says, as the released model does. Training
materialises per-head keys and values (the "naive" form); the absorbed-weight latent cache of
inference is a separate path (kv_cache.py).

Recomputation (SPEC.md §3.2, V3's memory trick): with ``recompute_up_projections`` set, the step from
the latents (c^Q before its norm, c^KV before its norm, k^R) to the attention output runs under
activation checkpointing: backward keeps only the latents, and recomputes the latent norms, the
up-projections q_b_proj / kv_b_proj and the attention core instead of storing per-head queries,
keys and values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv3_lightning.config import ModelConfig
from dsv3_lightning.model.norm import RMSNorm
from dsv3_lightning.model.rope import apply_rotary

LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = c.v_head_dim, c.kv_lora_rank
        self.softmax_scale = c.softmax_scale
        self.rope_interleave = c.rope_interleave  # pair layout of the RoPE dims (rope.apply_rotary)
        q_out = c.num_attention_heads * c.qk_head_dim
        self.compress_queries = c.q_lora_rank is not None
        if not self.compress_queries:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.recompute_up_projections = False

    def project_queries(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Queries [B, S, H, N + R], RoPE not yet applied."""
        if self.compress_queries:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        else:
            q = self.q_proj(x_BSD)
        return q.unflatten(-1, (self.num_heads, -1))

    def project_latent(
        self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What MLA caches: the normalised latent c^KV [B, S, Ckv] and the roped shared key [B, S, 1, R]."""
        latent, k_rope = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        return self.kv_a_layernorm(latent), apply_rotary(k_rope.unsqueeze(2), cos, sin, self.rope_interleave)

    def compress(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The down-projections: c^Q before its norm (or full queries without compression), and
        [c^KV ; k~^R] before the latent norm and RoPE."""
        q = self.q_a_proj(x_BSD) if self.compress_queries else self.q_proj(x_BSD)
        return q, self.kv_a_proj_with_mqa(x_BSD)

    def attend(self, q_latent: torch.Tensor, kv_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None = None):
        """From the down-projections to the heads' outputs [B, S, H·V] (before o_proj); causal, or the
        boolean ``mask`` [B, 1, S, S] of packed documents (model/documents.py) when given."""
        q = self.q_b_proj(self.q_a_layernorm(q_latent)) if self.compress_queries else q_latent
        q_nope, q_rope = q.unflatten(-1, (self.num_heads, -1)).split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        q = torch.cat((q_nope, apply_rotary(q_rope, cos, sin, self.rope_interleave)), -1)

        latent, k_rope = kv_latent.split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin, self.rope_interleave)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).unflatten(-1, (self.num_heads, -1))
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], -1)
        k = torch.cat((k_nope, k_rope.expand(-1, -1, self.num_heads, -1)), -1)

        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
            scale=self.softmax_scale,
        )
        return out.transpose(1, 2).flatten(2)

    def from_latents(self, q_latent: torch.Tensor, kv_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     mask: torch.Tensor | None = None):
        """Everything after ``compress``: attention and o_proj, recomputed in backward if asked."""
        if self.recompute_up_projections and torch.is_grad_enabled():
            return self.o_proj(checkpoint(self.attend, q_latent, kv_latent, cos, sin, mask, use_reentrant=False))
        return self.o_proj(self.attend(q_latent, kv_latent, cos, sin, mask))

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.from_latents(*self.compress(x_BSD), cos, sin, mask)
