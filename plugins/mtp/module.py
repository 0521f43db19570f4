"""One multi-token-prediction module (SPEC.md §5), named as layer ``N + k`` of DeepSeek's checkpoint.

    h_k = TRM_k( eh_proj( [enorm(Emb(t_{i+k})) ; hnorm(h_{k-1})] ) )      (embedding first, as released)
    logits_k = lm_head( shared_head.norm(h_k) )                             (Emb and lm_head: the model's)

The module *is* a decoder layer (``self_attn``, ``mlp``, ``input_layernorm``,
``post_attention_layernorm``) built like the main model's MoE layers, plus ``enorm``, ``hnorm``,
``eh_proj`` and ``shared_head.norm``: exactly the keys of ``model.layers.{N + k}.*`` in the release.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3_lightning.config import ModelConfig
from dsv3_lightning.model.norm import RMSNorm
from dsv3_lightning.model.transformer import DecoderLayer


class SharedHead(nn.Module):
    """The released checkpoint's ``shared_head``: its own final norm (the output matrix is the model's)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MTPModule(DecoderLayer):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        if not config.is_moe_layer(layer_idx):
            raise ValueError(f"MTP layer {layer_idx} would be dense; MTP modules are MoE blocks")
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def fuse(self, h_prev_BSD: torch.Tensor, emb_BSD: torch.Tensor) -> torch.Tensor:
        """The block's input: the projection of [enorm(embedding) ; hnorm(previous depth's state)]."""
        return self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_prev_BSD)], dim=-1))

    def forward(
        self, h_prev_BSD: torch.Tensor, emb_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return super().forward(self.fuse(h_prev_BSD, emb_BSD), cos, sin, mask)
