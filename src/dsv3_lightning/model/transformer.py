"""The DeepSeek-V3 transformer: pre-norm blocks of MLA and a dense or MoE MLP (SPEC.md §2).

Module names are those of the released checkpoint (``model.layers.{i}.self_attn.q_a_proj`` ...,
``lm_head``), so that the Hugging Face converter is a short adapter and FP8 conversion can select
layers by name.

    h = embed_tokens(ids)
    for each layer:  h = h + self_attn(input_layernorm(h));  h = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))                        (embedding and head are not tied)

Stage seam: ``embed``, ``run_layers(h, start, end)`` and ``head`` are the three pieces a pipeline
strategy cuts the model into; ``forward`` is just their composition. ``forward`` returns a
``CausalLMOutput`` whose ``hidden_states`` (last layer, before the final norm) feed prediction heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv3_lightning.config import ModelConfig
from dsv3_lightning.model.attention import MultiHeadLatentAttention
from dsv3_lightning.model.documents import document_mask, document_positions
from dsv3_lightning.model.init import draw_seed, init_weights_
from dsv3_lightning.model.moe import MLP, MoE
from dsv3_lightning.model.norm import RMSNorm
from dsv3_lightning.model.rope import RotaryEmbedding
from dsv3_lightning.model.router import Router

if TYPE_CHECKING:
    from dsv3_lightning.hf import HFOrigin


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MultiHeadLatentAttention(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.recompute = False
        self.compile_options: dict | None = None
        """``torch.compile`` options when the blocks run compiled (``compile_blocks``), else None."""
        self._compiled = None

    @property
    def checkpoint_prefix(self) -> str:
        """The checkpoint key prefix of this layer's tensors, which names them for initialisation
        (init.py): layer N + k for a multi-token-prediction module, as in the release."""
        return f"model.layers.{self.layer_idx}."

    def set_recomputation(self, enabled: bool) -> None:
        """V3's memory trick (SPEC.md §3.2): recompute the attention input's RMSNorm with the MLA
        down-projections, and the up-projections with the attention core, in backward."""
        self.recompute = enabled
        self.self_attn.recompute_up_projections = enabled

    def _normed_latents(self, h_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.self_attn.compress(self.input_layernorm(h_BSD))

    def attention_block(self, h_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """h + MLA(input_layernorm(h)); ``mask``: packed documents' attention mask (model/documents.py)."""
        if self.recompute and torch.is_grad_enabled():
            latents = checkpoint(self._normed_latents, h_BSD, use_reentrant=False)
        else:
            latents = self._normed_latents(h_BSD)
        return h_BSD + self.self_attn.from_latents(*latents, cos, sin, mask)

    def mlp_block(self, h_BSD: torch.Tensor) -> torch.Tensor:
        """h + MLP(post_attention_layernorm(h)), the MLP dense or MoE."""
        return h_BSD + self.mlp(self.post_attention_layernorm(h_BSD))

    def forward(self, h_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.compile_options is None:
            return self.mlp_block(self.attention_block(h_BSD, cos, sin, mask))
        attention_block, mlp_block = self._compiled_blocks()
        return mlp_block(attention_block(h_BSD, cos, sin, mask))

    def compile_blocks(self, **options) -> None:
        """Runs the attention block, and the MLP block of a dense layer, through ``torch.compile``
        (``options`` go to it). A MoE layer's MLP block stays eager: the routed path's shapes depend on
        the routing (``bincount``), and torch's ``grouped_mm`` has no float32 kernel for the compiler's
        fake tensors. The compiled functions are built on first use and never copied or pickled (a
        copy of the layer compiles its own), so that a deep copy (EMA, SWA) runs its own weights."""
        self.compile_options = options
        self._compiled = None

    def _compiled_blocks(self):
        if self._compiled is None:
            mlp_block = self.mlp_block if isinstance(self.mlp, MoE) else torch.compile(self.mlp_block, **self.compile_options)
            self._compiled = (torch.compile(self.attention_block, **self.compile_options), mlp_block)
        return self._compiled

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_compiled"] = None
        return state


class DeepSeekV3Model(nn.Module):
    """Embedding, decoder layers and final norm (the checkpoint's ``model.*``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    """[B, S, vocab]."""
    hidden_states: torch.Tensor
    """Last layer's output before the final norm, [B, S, D]: the input of multi-token prediction."""


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 causal language model; ``DeepSeekV3(config)(input_ids).logits`` is [B, S, vocab].

    Built on the meta device (``with torch.device("meta")``) it holds no values: ``materialize_``
    (materialize.py) allocates and initialises what a rank keeps, with the values a model built
    normally with the same ``init_seed`` has.
    """

    checkpoint_prefix = ""
    """Tensors below are named by their checkpoint keys (init.py), wherever the model is nested."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.init_seed = draw_seed()
        """Seeds every tensor's initial values by name (init.py): drawn from torch's global generator
        before anything else (the layers' constructors draw from it too, but not on the meta device)."""
        self.model = DeepSeekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.hf_origin: HFOrigin | None = None
        """The Hugging Face directory ``from_pretrained`` read (family, config.json, keys of the MTP
        modules the core does not hold), for writing the model back in its own format (hf.py)."""
        self.reset_parameters()

    # ------------------------------------------------------------------ initialisation
    def reset_parameters(self) -> None:
        self.init_weights(self)

    def init_weights(self, root: nn.Module) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, a zero selection bias, each
        tensor from a generator seeded by ``init_seed`` and its name (init.py); meta tensors are left.

        ``root`` may be a module built outside the model (a prediction head's layers) that should
        start like the model's own.
        """
        init_weights_(root, self.init_seed, std=self.config.initializer_range)

    def reset_buffers(self) -> None:
        """Rebuilds the derived, non-persistent buffers (RoPE frequencies, router counts).

        A model built on the meta device and filled from a checkpoint (``load_state_dict(assign=True)``)
        needs this, since checkpoints hold only persistent state.
        """
        device = self.lm_head.weight.device
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers(device)

    # ------------------------------------------------------------------ stage seam
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def rotary(self, seq_len: int, device: torch.device, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(offset, offset + seq_len, device=device)
        return self.model.rotary_emb(positions)

    def attention_inputs(
        self, seq_len: int, device: torch.device, documents_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(cos, sin, mask) every layer of one forward shares: plain causal positions and no mask, or
        with packed ``documents`` [B, S] positions restarting at each document and attention kept
        inside it (model/documents.py)."""
        if documents_BS is None:
            return *self.rotary(seq_len, device), None
        cos, sin = self.model.rotary_emb(document_positions(documents_BS))
        return cos, sin, document_mask(documents_BS)

    def run_layers(
        self, h_BSD: torch.Tensor, start: int = 0, end: int | None = None, *, documents: torch.Tensor | None = None
    ) -> torch.Tensor:
        cos, sin, mask = self.attention_inputs(h_BSD.shape[1], h_BSD.device, documents)
        for layer in self.model.layers[start:end]:
            h_BSD = layer(h_BSD, cos, sin, mask)
        return h_BSD

    def head(self, h_BSD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h_BSD))

    def forward(self, input_ids: torch.Tensor, documents: torch.Tensor | None = None) -> CausalLMOutput:
        """``documents`` [B, S]: the packed document of each position (model/documents.py), or None."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.config.max_position_embeddings "
                f"({self.config.max_position_embeddings}); shorten the input or raise max_position_embeddings"
            )
        if documents is not None and documents.shape != input_ids.shape:
            raise ValueError(f"documents {tuple(documents.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        hidden = self.run_layers(self.embed(input_ids), documents=documents)
        return CausalLMOutput(logits=self.head(hidden), hidden_states=hidden)

    def compile_blocks(self, **options) -> None:
        """Compiles every decoder layer's attention block and dense MLP block (``DecoderLayer.compile_blocks``)."""
        for layer in self.model.layers:
            layer.compile_blocks(**options)

    # ------------------------------------------------------------------ introspection
    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def routers(self) -> list[Router]:
        return [moe.gate for moe in self.moe_layers()]

    def num_parameters(self) -> tuple[int, int]:
        """(total, activated per token): activated counts K of the N routed experts of each MoE layer.

        Counts the whole model even when expert parallelism keeps only a shard of each layer's experts
        on this process (the per-expert size is read from the local shard).
        """
        moes = self.moe_layers()
        expert_params = {id(p) for moe in moes for p in (moe.experts.gate_up_proj, moe.experts.down_proj)}
        total = sum(p.numel() for p in self.parameters() if id(p) not in expert_params)
        inactive = 0
        for moe in moes:
            local = moe.experts.gate_up_proj.shape[0]
            per_expert = (moe.experts.gate_up_proj.numel() + moe.experts.down_proj.numel()) // local
            total += self.config.n_routed_experts * per_expert
            inactive += (self.config.n_routed_experts - moe.gate.top_k) * per_expert
        return total, total - inactive

    # ------------------------------------------------------------------ Hugging Face interop
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None) -> DeepSeekV3:
        """Loads a Hugging Face directory of the family (deepseek_v3, deepseek_v2, kimi_k2, kimi_k25's text
        model, glm4_moe_lite; bf16, fp32 or block FP8; one or many shards)."""
        from dsv3_lightning.hf import load_pretrained

        return load_pretrained(cls, path, dtype=dtype)

    def save_pretrained(
        self,
        path: str | Path,
        *,
        max_shard_size: int = 5 * 2**30,
        extra_state: dict | None = None,
        model_type: str | None = None,
    ) -> None:
        """Writes a directory that transformers loads (per-expert keys), in the model_type it was
        loaded from (deepseek_v3 / deepseek_v2 for a model built here; ``model_type`` overrides).

        ``extra_state``: more tensors under their checkpoint keys, e.g. MTP modules as layers >= N.
        """
        from dsv3_lightning.hf import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, extra_state=extra_state, model_type=model_type)
