"""ModelConfig: the shape of a DeepSeek-V3-style transformer.

Field names are those of Hugging Face's ``DeepseekV3Config`` (and so of the released checkpoint's
config.json), so that one naming runs from YAML to the converter. The class is a keyword-only
dataclass: jsonargparse reads the attribute docstrings as ``--help`` text and ``--print_config``
comments, and ``__post_init__`` rejects inconsistent shapes with a message that names the YAML key
(``model.config.<field>``), the value seen and the fix.

Deliberate differences from the HF class: no fields that are fixed for this architecture
(``hidden_act`` is SiLU, embeddings are untied, there are no linear biases), YaRN is a typed
dataclass instead of a free dict, and ``initializer_range`` defaults to the paper's 0.006 rather than
HF's 0.02. The group score of group-limited routing follows the scoring function, as in both released
families: the sum of the top-2 biased scores for ``sigmoid`` (V3), the maximum for ``softmax`` (V2).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal

_KEY = "model.config"


@dataclass(kw_only=True)
class YarnRopeScaling:
    """YaRN context extension of the decoupled RoPE key (SPEC.md §3.1; V3 uses factor 40 over 4096)."""

    factor: float
    """Context extension factor s; frequencies beyond the ramp are divided by it."""
    original_max_position_embeddings: int = 4096
    """Context length the model was pre-trained at before extension."""
    beta_fast: float = 32.0
    """Rotation count that bounds the extrapolated (unchanged) high frequencies."""
    beta_slow: float = 1.0
    """Rotation count that bounds the fully interpolated low frequencies."""
    mscale: float = 1.0
    """YaRN mscale of the cos/sin attention factor (numerator)."""
    mscale_all_dim: float = 1.0
    """YaRN mscale used for the softmax scale (mscale² multiplies it) and the cos/sin denominator."""

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(
                f"{_KEY}.rope_scaling.factor ({self.factor}) must be >= 1: YaRN only extends the context. "
                "Remove rope_scaling for plain RoPE."
            )
        if self.original_max_position_embeddings < 1:
            raise ValueError(
                f"{_KEY}.rope_scaling.original_max_position_embeddings "
                f"({self.original_max_position_embeddings}) must be positive"
            )
        if self.beta_fast < self.beta_slow:
            raise ValueError(
                f"{_KEY}.rope_scaling.beta_fast ({self.beta_fast}) must be at least beta_slow ({self.beta_slow}); "
                "equal values (Kimi-K2: 1 and 1) give the narrowest ramp"
            )

    @staticmethod
    def get_mscale(factor: float, mscale: float = 1.0) -> float:
        """YaRN's attention temperature √t = 0.1·mscale·ln(s) + 1 (1 when s <= 1)."""
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(kw_only=True)
class ModelConfig:
    """Shape and routing of a DeepSeek-V3-style model, in Hugging Face ``DeepseekV3Config`` names."""

    vocab_size: int
    """Vocabulary size of the embedding and the untied output head."""
    hidden_size: int
    """Model width d (7168 in V3)."""
    intermediate_size: int
    """Hidden size of the dense SwiGLU MLP of the first ``first_k_dense_replace`` layers."""
    moe_intermediate_size: int
    """Hidden size of one routed expert (and, times ``n_shared_experts``, of the shared expert)."""
    num_hidden_layers: int
    """Number of transformer blocks (multi-token prediction modules not included)."""
    num_attention_heads: int
    """Attention heads n_h."""
    q_lora_rank: int | None = None
    """Rank d'_c of the low-rank query compression; None projects queries directly (V2-Lite)."""
    kv_lora_rank: int
    """Rank d_c of the joint key/value latent, the part of the MLA cache without position."""
    qk_nope_head_dim: int
    """Per-head query/key dimension without position (d_h)."""
    qk_rope_head_dim: int
    """Dimension d_h^R of the decoupled RoPE query per head and of the one RoPE key shared by all heads."""
    v_head_dim: int
    """Per-head value dimension."""
    first_k_dense_replace: int = 1
    """The first k layers use a dense MLP; every later layer is MoE (3 in V3)."""
    n_routed_experts: int
    """Routed experts per MoE layer N_r."""
    n_shared_experts: int = 1
    """Shared experts per MoE layer, fused into one MLP of width n_shared_experts·moe_intermediate_size."""
    num_experts_per_tok: int
    """Routed experts activated per token K_r."""
    n_group: int = 1
    """Expert groups for group-limited routing (nodes under expert parallelism)."""
    topk_group: int = 1
    """Groups a token may route to (M in the paper)."""
    routed_scaling_factor: float = 1.0
    """Scale applied to the routed experts' gate values (2.5 in V3)."""
    norm_topk_prob: bool = True
    """Normalise the selected gate values to sum to 1 (V3: yes)."""
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """Affinity function of the router: sigmoid (V3) or softmax (V2)."""
    max_position_embeddings: int = 4096
    """Longest sequence the model accepts."""
    rope_theta: float = 10000.0
    """RoPE base θ."""
    rope_scaling: YarnRopeScaling | None = None
    """YaRN scaling of RoPE; None for plain RoPE (pre-training at 4K)."""
    rope_interleave: bool = True
    """RoPE rotates interleaved pairs (x[2i], x[2i+1]), as DeepSeek's weights expect; false rotates the
    two halves (x[i], x[i + d/2]), HF's ``rotate_half``, for checkpoints trained that way."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the block and final RMSNorms (the latent norms use 1e-6, as the released model)."""
    num_nextn_predict_layers: int = 0
    """Multi-token prediction depth D recorded in checkpoints; the MTP plugin builds the modules."""
    initializer_range: float = 0.006
    """Standard deviation of the normal initialisation (0.006 in the paper; HF's default is 0.02)."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = YarnRopeScaling(**self.rope_scaling)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{_KEY}.{name} ({value!r}) must be a positive integer")
        for name in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{_KEY}.{name} ({value!r}) must be a non-negative integer")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(
                f"{_KEY}.q_lora_rank ({self.q_lora_rank}) must be positive; set it to null to project "
                "queries without compression"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"{_KEY}.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: RoPE rotates pairs"
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"{_KEY}.first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers "
                f"({self.num_hidden_layers}); set it to at most {self.num_hidden_layers}"
            )
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"{_KEY}.scoring_func ({self.scoring_func!r}) must be 'sigmoid' or 'softmax'")
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"{_KEY}.n_routed_experts ({self.n_routed_experts}) must be divisible by "
                f"{_KEY}.n_group ({self.n_group}); choose n_group among "
                f"{[g for g in range(1, self.n_routed_experts + 1) if self.n_routed_experts % g == 0]}"
            )
        if self.topk_group > self.n_group:
            raise ValueError(
                f"{_KEY}.topk_group ({self.topk_group}) must be at most {_KEY}.n_group ({self.n_group})"
            )
        experts_per_group = self.n_routed_experts // self.n_group
        reachable = self.topk_group * experts_per_group
        if self.num_experts_per_tok > reachable:
            raise ValueError(
                f"{_KEY}.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the {reachable} experts in "
                f"the kept groups (topk_group {self.topk_group} x {experts_per_group} experts per group); "
                "lower num_experts_per_tok or raise topk_group"
            )
        if self.scoring_func == "sigmoid" and self.n_group > 1 and experts_per_group < 2:
            raise ValueError(
                f"{_KEY}.n_group ({self.n_group}) leaves {experts_per_group} expert per group, but sigmoid "
                "routing scores a group by the sum of its top-2 experts; use at most "
                f"{self.n_routed_experts // 2} groups"
            )
        if not isinstance(self.rope_interleave, bool):
            raise ValueError(f"{_KEY}.rope_interleave ({self.rope_interleave!r}) must be true or false")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnRopeScaling):
            raise ValueError(f"{_KEY}.rope_scaling ({self.rope_scaling!r}) must be a YaRN mapping or null")

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: content part plus RoPE part (192 in V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/√(d_h + d_h^R), times mscale² under YaRN (HF's rule, which uses mscale_all_dim)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = YarnRopeScaling.get_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = _KEY) -> ModelConfig:
        """Builds a config from a plain mapping, rejecting unknown keys with the closest valid name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, names, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(hints)}; valid keys are {', '.join(sorted(names))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


__all__ = ["ModelConfig", "YarnRopeScaling"]
