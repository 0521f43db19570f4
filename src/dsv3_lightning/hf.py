"""Hugging Face checkpoint interop: ``config.json`` and safetensors <-> ``ModelConfig`` and ``DeepSeekV3``.

Our module names are the checkpoint's, so the state-dict mapping has one real rule: routed experts
are stored stacked in memory (``experts.gate_up_proj`` [E, 2I, D], gate rows first, and
``experts.down_proj`` [E, D, I]) and per expert on disk (``experts.{e}.gate_proj.weight`` ...), as
transformers writes them (HF_INTEROP.md §5).

Loading streams: the model is built on the meta device and each tensor is read from its shard once,
so peak memory is about one model. Keys of layers ``>= num_hidden_layers`` are DeepSeek's
multi-token-prediction modules; the core model has none, so they are returned separately and
reported, never dropped silently. Saving writes each file under a temporary name and renames it into
place, the index after the shards and ``config.json`` last, so an interrupted save never leaves a
directory that looks complete but is not; every file gets the mode of a new file under the umask
(``new_file_mode``), not the 0600 of safetensors' own temporary file.

Sigmoid routers are written as ``deepseek_v3``; softmax routers as ``deepseek_v2`` (the only Hugging
Face class that computes them), which has no selection bias and no gate normalisation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsv3_lightning.config import ModelConfig, YarnRopeScaling

if TYPE_CHECKING:
    from dsv3_lightning.model.transformer import DeepSeekV3

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

# HF config entries that must have these values for our model to compute the same function.
_REQUIRED_HF_VALUES = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "moe_layer_freq": 1,
    "ep_size": 1,
}
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------- config
def config_from_hf(hf: Mapping[str, Any], *, source: str = CONFIG_NAME) -> ModelConfig:
    """Our config from a Hugging Face DeepseekV3 (or V2) ``config.json`` mapping."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; dsv3_lightning loads "
            f"{' or '.join(SUPPORTED_MODEL_TYPES)} checkpoints. Point from_pretrained at a DeepSeek-V3 "
            "(or V2) Hugging Face directory."
        )
    for key, expected in _REQUIRED_HF_VALUES.items():
        if key in hf and hf[key] is not None and hf[key] != expected:
            raise ValueError(f"{source}: {key} = {hf[key]!r} is not supported (only {expected!r})")
    heads = hf.get("num_key_value_heads")
    if heads is not None and heads != hf.get("num_attention_heads"):
        raise ValueError(
            f"{source}: num_key_value_heads ({heads}) must equal num_attention_heads: MLA has no GQA"
        )
    if hf.get("quantization_config"):
        raise ValueError(
            f"{source}: the checkpoint is quantized ({hf['quantization_config'].get('quant_method')!r}); "
            "dequantize it first: python -m dsv3_lightning.plugins.fp8.checkpoint dequantize SRC DST"
        )

    fields = {name for name in ModelConfig.__dataclass_fields__}
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
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported; use 'yarn' or none")

    if model_type == "deepseek_v2":
        values["scoring_func"] = "softmax"
        if hf.get("topk_method", "greedy") == "greedy":
            values["n_group"] = values["topk_group"] = 1
        values.setdefault("norm_topk_prob", False)
    elif hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"{source}: deepseek_v3 with scoring_func {hf['scoring_func']!r} is not supported")
    return ModelConfig(**values)


def config_to_hf(config: ModelConfig, *, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` that transformers' DeepseekV3ForCausalLM (or V2 for softmax) loads."""
    hf: dict[str, Any] = {k: v for k, v in config.to_dict().items() if k != "rope_scaling"}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {"rope_type": "yarn", "rope_theta": config.rope_theta, **dataclasses.asdict(config.rope_scaling)}
    v3 = config.scoring_func == "sigmoid"
    hf.update(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.qk_rope_head_dim,
        hidden_act="silu",
        attention_bias=False,
        tie_word_embeddings=False,
        rope_parameters=rope,
        dtype=str(dtype).removeprefix("torch."),
    )
    if v3:
        hf.update(topk_method="noaux_tc", rope_interleave=True)
    else:
        hf["topk_method"] = "greedy" if config.n_group == 1 else "group_limited_greedy"
    return hf


# ---------------------------------------------------------------------------------------- state dict
def state_dict_to_hf(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (stacked-expert) state dict as Hugging Face (per-expert) keys, lazily."""
    for name, tensor in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", gate[e]
                yield f"{prefix}.{e}.up_proj.weight", up[e]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", tensor[e]
        else:
            yield name, tensor


class _CheckpointReader:
    """Random access to the tensors of a single-file or index-sharded safetensors checkpoint."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        if (path / INDEX_FILE).is_file():
            weight_map = _read_json(path / INDEX_FILE)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / SINGLE_FILE).is_file():
            files, weight_map = [SINGLE_FILE], None
        else:
            raise FileNotFoundError(
                f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face model directory?"
            )
        self._handles = {}
        for file in files:
            try:
                self._handles[file] = safe_open(str(path / file), framework="pt")
            except Exception as err:  # safetensors raises its own error types for truncated headers
                raise ValueError(f"{path / file}: unreadable safetensors file ({err}); re-download or re-save it") from err
        if weight_map is None:
            weight_map = {key: SINGLE_FILE for key in self._handles[SINGLE_FILE].keys()}
        self.weight_map: dict[str, str] = weight_map
        self.path = path

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self.weight_map[key]].get_tensor(key)
        except KeyError:
            raise
        except Exception as err:
            raise ValueError(f"{self.path / self.weight_map[key]}: cannot read {key!r} ({err}); the file is corrupt") from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def extra_layer_indices(keys: Iterable[str], num_hidden_layers: int) -> set[int]:
    """The layer indices >= ``num_hidden_layers`` among checkpoint ``keys``: the release's MTP modules."""
    return {int(m.group(1)) for key in keys if (m := _LAYER_KEY.match(key)) and int(m.group(1)) >= num_hidden_layers}


def _read_hf_state(
    reader: _CheckpointReader,
    expected: Mapping[str, torch.Tensor],
    num_layers: int,
    *,
    allocate: Callable[[torch.Size, torch.dtype], torch.Tensor] | None = None,
    skip_extra: Callable[[str], bool] = lambda key: False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(our state dict for the ``expected`` names, the MTP tensors of layers >= num_layers).

    ``allocate(shape, dtype)``, when given, makes the tensor each entry is copied into (streaming
    conversion passes file-backed memory, so that only one checkpoint tensor at a time is held);
    ``skip_extra(key)`` leaves out MTP tensors the caller does not need.
    """
    experts: dict[str, dict[tuple[int, str], str]] = {}
    plain, extra = {}, {}
    for key in reader.weight_map:
        layer = _LAYER_KEY.match(key)
        if layer and int(layer.group(1)) >= num_layers:
            if not skip_extra(key):
                extra[key] = reader.get(key)
        elif match := _EXPERT_KEY.match(key):
            experts.setdefault(match.group(1), {})[(int(match.group(2)), match.group(3))] = key
        else:
            plain[key] = key
    state: dict[str, torch.Tensor] = {}
    missing, shapes = [], []
    for name, ref in expected.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("gate_up_proj", "down_proj") and prefix.endswith("mlp.experts"):
            parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
            keys = experts.get(prefix, {})
            needed = [(e, p) for e in range(ref.shape[0]) for p in parts]
            absent = [f"{prefix}.{e}.{p}.weight" for e, p in needed if (e, p) not in keys]
            if absent:
                missing += absent
                continue
            tensor = None
            for e in range(ref.shape[0]):  # one expert at a time into the stacked tensor
                expert = torch.cat([reader.get(keys[(e, p)]) for p in parts], dim=0)
                if tensor is None:
                    shape = (ref.shape[0], *expert.shape)
                    tensor = allocate(shape, expert.dtype) if allocate else torch.empty(shape, dtype=expert.dtype)
                tensor[e] = expert
        elif name in plain:
            tensor = reader.get(plain.pop(name))
            if allocate is not None:
                tensor = allocate(tensor.shape, tensor.dtype).copy_(tensor)
        else:
            missing.append(name)
            continue
        if tuple(tensor.shape) != tuple(ref.shape):
            shapes.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(ref.shape)}")
        state[name] = tensor
    unexpected = sorted(set(plain) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {shapes[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
    if problems:
        raise ValueError(
            f"{reader.path}: checkpoint does not match its config.json: " + "; ".join(problems)
        )
    return state, extra


# ---------------------------------------------------------------------------------------- load / save
def load_pretrained(
    cls: type[DeepSeekV3], path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> DeepSeekV3:
    """Builds ``cls`` from a Hugging Face directory; MTP tensors, if any, land in ``model.mtp_checkpoint_state``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; a Hugging Face model directory needs a config.json")
    config = config_from_hf(_read_json(config_path), source=str(config_path))
    reader = _CheckpointReader(path)
    dtype = dtype or torch.get_default_dtype()
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    absent_in_v2 = {}  # DeepSeek-V2 checkpoints have no selection bias: it starts at zero
    if config.scoring_func == "softmax":
        absent_in_v2 = {k: torch.zeros(v.shape) for k, v in expected.items() if k.endswith("e_score_correction_bias")}
        expected = {k: v for k, v in expected.items() if k not in absent_in_v2}
    state, extra = _read_hf_state(reader, expected, config.num_hidden_layers)
    state.update(absent_in_v2)
    state = {  # the selection bias stays float32 whatever the weights' dtype
        name: tensor.to(torch.float32 if name.endswith("e_score_correction_bias") else dtype)
        for name, tensor in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    model.to(dtype)
    model.reset_buffers()
    model.mtp_checkpoint_state = extra
    if extra:
        log.warning(
            "%s: %d tensor(s) of layers >= num_hidden_layers (%d) are multi-token-prediction modules; the "
            "core model does not use them (attach dsv3_lightning.plugins.mtp to load them): kept in "
            "model.mtp_checkpoint_state and written back by save_pretrained",
            path,
            len(extra),
            config.num_hidden_layers,
        )
    return model


def save_pretrained(
    model: DeepSeekV3,
    path: str | os.PathLike,
    *,
    max_shard_size: int = 5 * 2**30,
    extra_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Writes ``config.json`` and safetensors shards (with an index when there are several).

    ``extra_state`` (default: the MTP tensors the model was loaded with) is written beside the model's
    own tensors under its checkpoint keys.
    """
    from safetensors.torch import save_file

    config = model.config
    if config.scoring_func == "softmax":
        if config.norm_topk_prob or any(r.e_score_correction_bias.any() for r in model.routers()):
            raise ValueError(
                "softmax routing is exported as Hugging Face deepseek_v2, which has neither gate "
                "normalisation nor a selection bias: set model.config.norm_topk_prob to false and keep "
                "the bias at zero, or use scoring_func 'sigmoid'"
            )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = dict(state_dict_to_hf(model.state_dict()))
    if config.scoring_func == "softmax":
        tensors = {k: v for k, v in tensors.items() if not k.endswith("e_score_correction_bias")}
    if extra_state is None:
        extra_state = getattr(model, "mtp_checkpoint_state", {})
    tensors.update(extra_state)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weights = [*path.glob("model*.safetensors"), path / INDEX_FILE]
    stale = sorted(p.name for p in weights if p.name not in names and p.exists())
    for name in stale:
        (path / name).unlink()
    if stale:  # a model saved over another one with more shards
        log.info("%s: removed %d stale weight file(s): %s", path, len(stale), ", ".join(stale))
    for name, shard in zip(names, shards):
        _atomic(path / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        _atomic(path / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2, sort_keys=True)))
    dtype = next(p.dtype for p in model.parameters())
    hf_config = config_to_hf(config, dtype=dtype)
    # MTP modules are layers N.. N+D-1; transformers and DeepSeek read D from num_nextn_predict_layers
    extra_layers = extra_layer_indices(extra_state, config.num_hidden_layers)
    if extra_layers:
        hf_config["num_nextn_predict_layers"] = len(extra_layers)
    _atomic(path / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(hf_config, indent=2)))


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file, ``0o666 & ~umask``: the mode every written file gets.

    Writers that go through a temporary file of their own (safetensors' ``save_file`` does) leave
    0600, which a shared model directory beside 0644 files must not have. The umask is read from
    /proc where Linux offers it: ``os.umask``, the portable way, sets it process-wide for a moment.
    """
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = [
    "config_from_hf", "config_to_hf", "extra_layer_indices", "load_pretrained", "save_pretrained",
    "state_dict_to_hf",
]
