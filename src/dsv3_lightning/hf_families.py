"""The checkpoint family of this architecture that transformers describes, as ``ModelConfig`` values.

Every family below is MLA attention with DeepSeekMoE; their ``config.json`` files differ in names
and defaults, never in the function computed, so each difference maps to a ``ModelConfig`` field and
the model has no per-family branch:

=================  ==========================  ==============================================================
model_type         transformers class          differences from deepseek_v3, and the field that holds them
=================  ==========================  ==============================================================
deepseek_v3        DeepseekV3ForCausalLM       (reference) sigmoid router, selection bias, ``rope_interleave``
kimi_k2            DeepseekV3ForCausalLM       the same fields (Kimi-K2 ships remote code under this name):
                                               ``n_group`` 1, ``routed_scaling_factor`` 2.827, ``rope_theta``
                                               50000, YaRN ``beta_fast`` = ``beta_slow`` = 1
kimi_k25           Kimi_K25ForConditionalGen.  the text model is ``text_config`` (a kimi_k2 / deepseek_v3
                                               config) under the key prefix ``language_model.``; the vision
                                               tower and projector are left out (logged), and the text model
                                               is written back under ``text_config``'s own model_type
glm4_moe_lite      Glm4MoeLiteForCausalLM      ``mlp_layer_types`` (dense..., sparse...) instead of
                                               ``first_k_dense_replace``; ``v_head_dim`` != ``qk_nope_head_dim``;
                                               one group; ``rms_norm_eps`` 1e-5
deepseek_v2        DeepseekV2ForCausalLM       softmax router (``scoring_func``), no selection bias, no gate
                                               normalisation by default; ``topk_method`` greedy = one group
=================  ==========================  ==============================================================

``q_lora_rank`` None (V2-Lite and others project queries directly) is a ``ModelConfig`` value in
every family. Writing back (``config_to_hf``) starts from the source's own ``config.json`` when there
is one and changes only the entries whose value differs from ours, so an unchanged model writes
back the very bytes it was read from, keys we do not model (``auto_map``, token ids,
``transformers_version``) included.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import torch

from dsv3_lightning.config import ModelConfig, YarnRopeScaling

V3_LIKE = ("deepseek_v3", "kimi_k2", "glm4_moe_lite")
"""Families with a sigmoid router and a selection bias."""
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2", "kimi_k25", "glm4_moe_lite")
ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "kimi_k2": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "glm4_moe_lite": "Glm4MoeLiteForCausalLM",
}
TEXT_KEY_PREFIXES = {"kimi_k25": ("language_model.model.layers.", "language_model.model.blocks.", "language_model.")}
"""Where a multimodal family keeps its text model; the first matching prefix is replaced (see
``text_key``). transformers 5.x writes kimi_k25's text layers as ``blocks`` (its reversed rename), the
release as ``layers``: both are read."""

# HF config entries that must have these values for our model to compute the same function.
_REQUIRED_HF_VALUES = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "moe_layer_freq": 1,
    "ep_size": 1,
}


def text_key(model_type: str | None, key: str) -> str | None:
    """The text model's checkpoint key (``model.layers.0...``) for a stored ``key``; None when the key
    is outside the text model (kimi_k25's ``vision_tower.*`` and ``mm_projector.*``)."""
    prefixes = TEXT_KEY_PREFIXES.get(model_type or "")
    if prefixes is None:
        return key
    layers, blocks, text = prefixes
    for prefix, replacement in ((layers, "model.layers."), (blocks, "model.layers."), (text, "")):
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return None


def text_config(hf: Mapping[str, Any], *, source: str) -> tuple[str, Mapping[str, Any]]:
    """(the text model's model_type, its config mapping); unwraps kimi_k25's ``text_config``.

    Refuses a model_type of another architecture with the list of the supported ones.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; dsv3_lightning loads checkpoints of the "
            f"MLA + DeepSeekMoE family: {', '.join(SUPPORTED_MODEL_TYPES)}. Point it at such a Hugging Face "
            "directory."
        )
    if model_type != "kimi_k25":
        return model_type, hf
    inner = hf.get("text_config")
    if not isinstance(inner, Mapping):
        raise ValueError(f"{source}: kimi_k25 config has no text_config mapping; the checkpoint is incomplete")
    if hf.get("tie_word_embeddings"):
        raise ValueError(f"{source}: tie_word_embeddings = True is not supported (only False)")
    inner_type = inner.get("model_type", "deepseek_v3")
    if inner_type not in ("kimi_k2", "deepseek_v3"):
        raise ValueError(f"{source}: kimi_k25 text_config.model_type {inner_type!r} is not kimi_k2 or deepseek_v3")
    merged = dict(inner)
    if "quantization_config" in hf and "quantization_config" not in merged:
        merged["quantization_config"] = hf["quantization_config"]
    return inner_type, merged


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Our config from the ``config.json`` mapping of any supported family (the module table)."""
    outer = hf.get("model_type")
    family, hf = text_config(hf, source=source)
    where = f"{source} ({outer} text_config)" if outer != family else source
    for key, expected in _REQUIRED_HF_VALUES.items():
        if key in hf and hf[key] is not None and hf[key] != expected:
            raise ValueError(f"{where}: {key} = {hf[key]!r} is not supported (only {expected!r})")
    heads = hf.get("num_key_value_heads")
    if heads is not None and heads != hf.get("num_attention_heads"):
        raise ValueError(f"{where}: num_key_value_heads ({heads}) must equal num_attention_heads: MLA has no GQA")
    quant = hf.get("quantization_config")
    if quant:
        fmt = (quant.get("quant_method"), quant.get("fmt", "e4m3"))
        if fmt != ("fp8", "e4m3"):
            raise ValueError(
                f"{where}: quantization_config {fmt} is not supported; only DeepSeek's block FP8 "
                "(quant_method 'fp8', fmt 'e4m3', weight_scale_inv per block) is read"
            )

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in hf.items() if k in fields and k != "rope_scaling" and v is not None}
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
    if rope_type == "yarn":
        yarn = {k: v for k, v in rope.items() if k in YarnRopeScaling.__dataclass_fields__}
        # HF treats an absent mscale / mscale_all_dim as "off" (falsy), not as 1.
        yarn["mscale"], yarn["mscale_all_dim"] = yarn.get("mscale") or 0.0, yarn.get("mscale_all_dim") or 0.0
        values["rope_scaling"] = YarnRopeScaling(**yarn)
    elif rope_type != "default":
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported; use 'yarn' or none")

    if family == "deepseek_v2":
        values["scoring_func"] = "softmax"
        values.pop("rope_interleave", None)  # V2 always rotates interleaved pairs (complex RoPE)
        if hf.get("topk_method", "greedy") == "greedy":
            values["n_group"] = values["topk_group"] = 1
        values.setdefault("norm_topk_prob", False)
    elif hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"{where}: {family} with scoring_func {hf['scoring_func']!r} is not supported (only 'sigmoid')")
    if family == "glm4_moe_lite":
        values["first_k_dense_replace"] = _leading_dense(hf, where)
    return ModelConfig(**values)


def _leading_dense(hf: Mapping[str, Any], where: str) -> int:
    """``first_k_dense_replace`` from glm4_moe_lite's ``mlp_layer_types`` (default: one dense layer)."""
    types = hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (hf["num_hidden_layers"] - 1)
    k = next((i for i, kind in enumerate(types) if kind != "dense"), len(types))
    if any(kind != "sparse" for kind in types[k:]) or len(types) != hf["num_hidden_layers"]:
        raise NotImplementedError(
            f"{where}: mlp_layer_types {types} is not 'dense' layers followed by 'sparse' ones for all "
            f"num_hidden_layers ({hf['num_hidden_layers']}); only that pattern (first_k_dense_replace) is supported"
        )
    return k


def default_family(config: ModelConfig) -> str:
    """The model_type a model built here is written as: deepseek_v3, or deepseek_v2 for softmax routing."""
    return "deepseek_v3" if config.scoring_func == "sigmoid" else "deepseek_v2"


def config_to_hf(
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    family: str | None = None,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of ``family`` (default: ``default_family``) for ``config``.

    ``base``, the source's own config.json (its text_config for kimi_k25), keeps its keys, order of
    rope form (``rope_parameters``, or the legacy ``rope_scaling`` + ``rope_theta``) and values;
    only entries whose value differs from ours are replaced.
    """
    family = family or default_family(config)
    if family == "kimi_k25":
        raise ValueError(
            "model_type 'kimi_k25' cannot be written: its vision tower is left out when it is loaded "
            "(dsv3_lightning models the text model only); save the text model as 'kimi_k2' (the default "
            "for a model loaded from kimi_k25)"
        )
    if family not in ARCHITECTURES:
        raise ValueError(f"model_type {family!r} cannot be written; choose one of {', '.join(ARCHITECTURES)}")
    if (family in V3_LIKE) != (config.scoring_func == "sigmoid"):
        raise ValueError(
            f"model_type {family!r} has a {'sigmoid' if family in V3_LIKE else 'softmax'} router but "
            f"model.config.scoring_func is {config.scoring_func!r}; save as {default_family(config)!r}"
        )
    hf: dict[str, Any] = {k: v for k, v in config.to_dict().items() if k != "rope_scaling"}
    legacy_rope = base is not None and "rope_scaling" in base and "rope_parameters" not in base
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {"rope_type": "yarn", "rope_theta": config.rope_theta, **dataclasses.asdict(config.rope_scaling)}
    if legacy_rope:
        hf["rope_theta"] = rope.pop("rope_theta")
        if config.rope_scaling is not None:
            rope["type"] = rope.pop("rope_type")
            hf["rope_scaling"] = rope
        else:
            hf["rope_scaling"] = None
    else:
        hf["rope_parameters"] = rope
    hf.update(
        architectures=[ARCHITECTURES[family]],
        model_type=family,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.qk_rope_head_dim,
        qk_head_dim=config.qk_head_dim,
        hidden_act="silu",
        attention_bias=False,
        tie_word_embeddings=False,
    )
    hf["torch_dtype" if base is not None and "torch_dtype" in base else "dtype"] = str(dtype).removeprefix("torch.")
    if family == "deepseek_v2":
        if not config.rope_interleave:
            raise ValueError(
                "model_type 'deepseek_v2' always rotates interleaved RoPE pairs but model.config.rope_interleave "
                "is false; save as 'deepseek_v3' (sigmoid) or keep rope_interleave true"
            )
        del hf["rope_interleave"], hf["scoring_func"]
        hf["topk_method"] = "greedy" if config.n_group == 1 else "group_limited_greedy"
    elif family == "glm4_moe_lite":
        k = hf.pop("first_k_dense_replace")
        del hf["scoring_func"]
        hf["mlp_layer_types"] = ["dense"] * k + ["sparse"] * (config.num_hidden_layers - k)
    else:
        hf["topk_method"] = "noaux_tc"
    if base is None:
        return hf
    merged = {k: v for k, v in base.items() if k != "quantization_config"}  # written dequantized
    changed = []
    for key, value in hf.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            value = {**old, **value}
        if key in merged and old != value:
            merged[key] = value
            changed.append((key, old))
    for key, old in changed:  # keep the source's spelling of an equal meaning (V2's n_group null = 1)
        if key not in _ALWAYS_OURS and _reads_as({**merged, key: old}, config):
            merged[key] = old
    if not _reads_as(merged, config):  # a value the source left to its default now differs
        merged.update({k: v for k, v in hf.items() if k not in merged})
    return merged


_ALWAYS_OURS = ("architectures", "model_type", "dtype", "torch_dtype")


def _reads_as(hf: Mapping[str, Any], config: ModelConfig) -> bool:
    try:
        return config_from_hf(hf) == config
    except (ValueError, TypeError, NotImplementedError):
        return False


def dumps(hf: Mapping[str, Any]) -> str:
    """config.json text as transformers writes it (sorted keys, two-space indent, final newline)."""
    return json.dumps(hf, indent=2, sort_keys=True) + "\n"


__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_hf", "config_to_hf", "default_family", "dumps", "text_config", "text_key"]
