"""MLA's inference caches: the latent cache with absorbed weights, and the naive per-head cache.

MLA's point at inference (SPEC.md §3.2) is that keys and values are functions of one small latent.
Per token and layer, ``LatentCache`` stores only the normalised latent c^KV (kv_lora_rank numbers) and
the roped shared key k^R (qk_rope_head_dim): 512 + 64 = 576 for V3, against 2·H·(d_h) = 32,768 for
multi-head attention of the same shape. It never expands them into per-head keys and values; the
up-projections are absorbed instead (DeepSeek's ``attn_impl="absorb"``):

    W^UK [H, N, Ckv], W^UV [H, V, Ckv]    the two halves of kv_b_proj, per head
    score(t, s) = ( (q^C_t W^UK) · c^KV_s  +  q^R_t · k^R_s ) · scale     q^C W^UK: [H, Ckv], once per query
    o_t         = W^UV ( Σ_s p(t, s) c^KV_s )                               attention in latent space, then up

which is the same arithmetic as the training path, reassociated. ``HeadCache`` is the naive
alternative, which caches the expanded per-head keys [H, N + R] and values [H, V]; it exists to measure
what absorption saves (``benchmarks/mla_decode.py``).

Both caches are preallocated for ``max_length`` positions and hold ``length`` of them; ``truncate``
rolls back (speculative decoding drops rejected drafts this way). A chunk of S new tokens attends to
the ``length`` cached positions and causally within itself, so prefill and decode are one code path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3_lightning.model.attention import MultiHeadLatentAttention
from dsv3_lightning.model.rope import apply_rotary


def _causal_mask(new: int, past: int, device: torch.device) -> torch.Tensor:
    """[new, past + new] booleans: query i (absolute position past + i) sees keys 0..past + i."""
    keys = torch.arange(past + new, device=device)
    return keys[None, :] <= (past + torch.arange(new, device=device))[:, None]


def _rope_queries(attn: MultiHeadLatentAttention, x_BSD, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    q_nope, q_rope = attn.project_queries(x_BSD).split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], -1)
    return q_nope, apply_rotary(q_rope, cos, sin, attn.rope_interleave)


class _Cache:
    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0

    def _reserve(self, new: int) -> tuple[int, int]:
        start, end = self.length, self.length + new
        if end > self.max_length:
            raise ValueError(
                f"the KV cache holds {self.max_length} positions and {end} are needed; build it with a larger "
                "max_length (at most model.config.max_position_embeddings)"
            )
        self.length = end
        return start, end

    def truncate(self, length: int) -> None:
        """Forgets every position from ``length`` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length


class LatentCache(_Cache):
    """One layer's c^KV [B, L, Ckv] and k^R [B, L, R]; attention with absorbed up-projections."""

    def __init__(self, attn: MultiHeadLatentAttention, batch_size: int, max_length: int, *, dtype, device) -> None:
        super().__init__(max_length)
        self.latent = torch.zeros(batch_size, max_length, attn.kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(batch_size, max_length, attn.qk_rope_head_dim, dtype=dtype, device=device)

    @staticmethod
    def numbers_per_token(attn: MultiHeadLatentAttention) -> int:
        return attn.kv_lora_rank + attn.qk_rope_head_dim

    def attend(self, attn: MultiHeadLatentAttention, x_BSD: torch.Tensor, cos, sin) -> torch.Tensor:
        S = x_BSD.shape[1]
        q_nope, q_rope = _rope_queries(attn, x_BSD, cos, sin)  # [B, S, H, N], [B, S, H, R]
        latent, k_rope = attn.project_latent(x_BSD, cos, sin)
        start, end = self._reserve(S)
        self.latent[:, start:end] = latent
        self.k_rope[:, start:end] = k_rope.squeeze(2)
        c_kv, k_r = self.latent[:, :end], self.k_rope[:, :end]

        w = attn.kv_b_proj.weight.view(attn.num_heads, attn.qk_nope_head_dim + attn.v_head_dim, -1)
        w_uk, w_uv = w.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=1)  # [H, N, C], [H, V, C]
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)
        scores = torch.einsum("bshc,btc->bhst", q_latent, c_kv) + torch.einsum("bshr,btr->bhst", q_rope, k_r)
        scores = scores.float() * attn.softmax_scale
        scores = scores.masked_fill(~_causal_mask(S, start, x_BSD.device), float("-inf"))
        probs = scores.softmax(-1).to(x_BSD.dtype)
        out_latent = torch.einsum("bhst,btc->bshc", probs, c_kv)
        out = torch.einsum("bshc,hvc->bshv", out_latent, w_uv)
        return attn.o_proj(out.flatten(2))


class HeadCache(_Cache):
    """The naive cache: one layer's per-head keys [B, H, L, N + R] and values [B, H, L, V]."""

    def __init__(self, attn: MultiHeadLatentAttention, batch_size: int, max_length: int, *, dtype, device) -> None:
        super().__init__(max_length)
        H = attn.num_heads
        self.k = torch.zeros(batch_size, H, max_length, attn.qk_nope_head_dim + attn.qk_rope_head_dim,
                             dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, H, max_length, attn.v_head_dim, dtype=dtype, device=device)

    @staticmethod
    def numbers_per_token(attn: MultiHeadLatentAttention) -> int:
        return attn.num_heads * (attn.qk_nope_head_dim + attn.qk_rope_head_dim + attn.v_head_dim)

    def attend(self, attn: MultiHeadLatentAttention, x_BSD: torch.Tensor, cos, sin) -> torch.Tensor:
        S = x_BSD.shape[1]
        q_nope, q_rope = _rope_queries(attn, x_BSD, cos, sin)
        q = torch.cat((q_nope, q_rope), -1).transpose(1, 2)
        latent, k_rope = attn.project_latent(x_BSD, cos, sin)
        k_nope, v = attn.kv_b_proj(latent).unflatten(-1, (attn.num_heads, -1)).split(
            [attn.qk_nope_head_dim, attn.v_head_dim], -1
        )
        k = torch.cat((k_nope, k_rope.expand(-1, -1, attn.num_heads, -1)), -1)
        start, end = self._reserve(S)
        self.k[:, :, start:end] = k.transpose(1, 2)
        self.v[:, :, start:end] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, self.k[:, :, :end], self.v[:, :, :end], attn_mask=_causal_mask(S, start, x_BSD.device),
            scale=attn.softmax_scale,
        )
        return attn.o_proj(out.transpose(1, 2).flatten(2))


def cache_class(kind: str) -> type[LatentCache | HeadCache]:
    """``"latent"`` (absorbed, MLA's own) or ``"heads"`` (naive, for comparison)."""
    kinds = {"latent": LatentCache, "heads": HeadCache}
    if kind not in kinds:
        raise ValueError(f"unknown KV cache kind {kind!r}; choose one of {sorted(kinds)}")
    return kinds[kind]


__all__ = ["HeadCache", "LatentCache", "cache_class"]
