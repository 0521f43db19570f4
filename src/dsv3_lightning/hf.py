"""Hugging Face checkpoint interop: ``config.json`` and safetensors <-> ``ModelConfig`` and ``DeepSeekV3``.

Every checkpoint of the MLA + DeepSeekMoE family that transformers describes is read and written
back in its own model_type: deepseek_v3, deepseek_v2, kimi_k2, the text model of kimi_k25 and
glm4_moe_lite (hf_families.py holds the table of their differences, each mapped to a
``ModelConfig`` field). Three small modules do the work:

- hf_families.py: config.json <-> ``ModelConfig``, per family;
- hf_checkpoint.py: tensors by key from one or many shards, prefixes removed, block FP8 dequantized
  while streaming (scales found through the index, in whichever shard);
- hf_experts.py: the one adapter between stacked experts (memory) and per-expert keys (disk).

Loading streams: the model is built on the meta device and each tensor is read from its shard once,
so peak memory is about one model. Keys of layers ``>= num_hidden_layers`` are DeepSeek's
multi-token-prediction modules; the core model has none and holds none of their values: their keys
and the source directory are recorded in ``model.hf_origin`` (``HFOrigin``), from which the MTP
head reads them when it is attached and ``save_pretrained`` copies them back, never dropped silently.
Saving writes each file under a temporary name and renames it into place, the index after the shards
and ``config.json`` last, so an interrupted save never leaves a directory that looks complete but is
not; every file gets the mode of a new file under the umask (``new_file_mode``), not the 0600 of
safetensors' own temporary file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsv3_lightning.config import ModelConfig
from dsv3_lightning.hf_checkpoint import (
    CONFIG_NAME,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    new_file_mode,
    read_json,
)
from dsv3_lightning.hf_experts import PER_EXPERT_KEY, expert_keys, stack_expert, stacked_leaf, unstack
from dsv3_lightning.hf_families import (
    SUPPORTED_MODEL_TYPES, config_from_hf, config_to_hf, default_family, dumps, text_config,
)  # fmt: skip

if TYPE_CHECKING:
    from dsv3_lightning.model.transformer import DeepSeekV3

log = logging.getLogger(__name__)

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
state_dict_to_hf = unstack  # the name benchmarks and older callers use


@dataclass
class HFOrigin:
    """Where a model read by ``from_pretrained`` came from: what writing it back needs.

    The core model holds no tensor beyond its own: the checkpoint's extra tensors (MTP modules,
    layers >= num_hidden_layers) stay in the source directory, listed in ``extra_keys`` and read on
    demand (``read_extra``) by the MTP head when attached and by ``save_pretrained``.
    """

    path: Path
    """The source directory."""
    model_type: str
    """The family the model is written back as (kimi_k25: its text model's model_type)."""
    config: dict[str, Any]
    """The source's config.json (kimi_k25: its text_config), written back with our values."""
    extra_keys: tuple[str, ...] = ()
    """Checkpoint keys of layers >= num_hidden_layers (multi-token-prediction modules)."""
    left_out: tuple[str, ...] = field(default=(), repr=False)
    """Stored keys outside the text model (kimi_k25's vision tower and projector), never read."""

    def read_extra(self, skip: Callable[[str], bool] = lambda key: False) -> dict[str, torch.Tensor]:
        """The ``extra_keys`` tensors, read now from the source (FP8 dequantized)."""
        keys = [key for key in self.extra_keys if not skip(key)]
        if not keys:
            return {}
        reader = CheckpointReader(self.path)
        missing = [key for key in keys if key not in reader.weight_map]
        if missing:
            raise FileNotFoundError(
                f"{self.path}: the checkpoint this model was loaded from no longer holds {missing[:3]}; "
                "keep the source directory until the model is saved, or pass extra_state explicitly"
            )
        return {key: reader.get(key) for key in keys}


def extra_layer_indices(keys: Iterable[str], num_hidden_layers: int) -> set[int]:
    """The layer indices >= ``num_hidden_layers`` among checkpoint ``keys``: the release's MTP modules."""
    return {int(m.group(1)) for key in keys if (m := _LAYER_KEY.match(key)) and int(m.group(1)) >= num_hidden_layers}


def _read_hf_state(
    reader: CheckpointReader,
    expected: Mapping[str, torch.Tensor],
    num_layers: int,
    *,
    allocate: Callable[[torch.Size, torch.dtype], torch.Tensor] | None = None,
    skip_extra: Callable[[str], bool] = lambda key: False,
    read_extra: bool = True,
    dtype_of: Callable[[str, torch.dtype], torch.dtype] = lambda name, stored: stored,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(our state dict for the ``expected`` names, the MTP tensors of layers >= num_layers).

    ``allocate(shape, dtype)``, when given, makes the tensor each entry is copied into (streaming
    conversion passes file-backed memory, so that only one checkpoint tensor at a time is held);
    ``skip_extra(key)`` leaves out MTP tensors the caller does not need; ``read_extra=False`` returns
    their keys mapped to None instead of reading them; ``dtype_of(name, stored dtype)`` is the dtype
    each tensor is converted to as soon as it is read (default: as stored).
    """
    plain, extra = {}, {}
    for key in reader.weight_map:
        layer = _LAYER_KEY.match(key)
        if layer and int(layer.group(1)) >= num_layers:
            if not skip_extra(key):
                extra[key] = reader.get(key) if read_extra else None
        elif not PER_EXPERT_KEY.match(key):
            plain[key] = key
    state: dict[str, torch.Tensor] = {}
    missing, shapes = [], []
    for name, ref in expected.items():
        if found := stacked_leaf(name):
            prefix, leaf = found
            absent = [
                key for e in range(ref.shape[0]) for key in expert_keys(prefix, leaf, e) if key not in reader.weight_map
            ]  # fmt: skip
            if absent:
                missing += absent
                continue
            tensor = None
            for e in range(ref.shape[0]):  # one expert at a time into the stacked tensor
                row = stack_expert(reader.get, prefix, leaf, e)
                if tensor is None:
                    shape, kind = (ref.shape[0], *row.shape), dtype_of(name, row.dtype)
                    tensor = allocate(shape, kind) if allocate else torch.empty(shape, dtype=kind)
                tensor[e] = row
        elif name in plain:
            tensor = reader.get(plain.pop(name))
            tensor = tensor.to(dtype_of(name, tensor.dtype))
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
        raise ValueError(f"{reader.path}: checkpoint does not match its config.json: " + "; ".join(problems))
    return state, extra


def read_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(our config, the config.json mapping) of the Hugging Face directory ``path``."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; a Hugging Face model directory needs a config.json")
    hf = read_json(config_path)
    return config_from_hf(hf, source=str(config_path)), hf


def origin_of(path: Path, hf: Mapping[str, Any], reader: CheckpointReader, num_layers: int) -> HFOrigin:
    """The ``HFOrigin`` of a directory: its family, config and keys beyond the core model."""
    family, text = text_config(hf, source=str(path / CONFIG_NAME))
    extra = tuple(sorted(k for k in reader.weight_map if (m := _LAYER_KEY.match(k)) and int(m.group(1)) >= num_layers))
    if reader.left_out:
        log.warning(
            "%s: model_type %r: the text model (text_config, %s) is loaded; the vision tower and projector "
            "(%d tensor(s), e.g. %s) are left out: dsv3_lightning models text only, and save_pretrained writes "
            "the text model as %r",
            path, hf.get("model_type"), family, len(reader.left_out), reader.left_out[:2], family,
        )  # fmt: skip
    return HFOrigin(path, family, dict(text), extra, tuple(reader.left_out))


# ---------------------------------------------------------------------------------------- load / save
def load_pretrained(
    cls: type[DeepSeekV3], path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> DeepSeekV3:
    """Builds ``cls`` from a Hugging Face directory of any supported family, FP8 dequantized.

    ``model.hf_origin`` records the source (family, config.json, MTP keys) for writing it back.
    """
    path = Path(path)
    config, hf = read_config(path)
    reader = CheckpointReader(path, hf_config=hf)
    dtype = dtype or torch.get_default_dtype()
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    absent_in_v2 = {}  # DeepSeek-V2 checkpoints have no selection bias: it starts at zero
    if config.scoring_func == "softmax":
        absent_in_v2 = {k: torch.zeros(v.shape) for k, v in expected.items() if k.endswith("e_score_correction_bias")}
        expected = {k: v for k, v in expected.items() if k not in absent_in_v2}

    def dtype_of(name: str, stored: torch.dtype) -> torch.dtype:
        # each tensor is converted as it is read (an FP8 one dequantized a few block rows at a
        # time first), so the process holds the model in ``dtype`` plus one checkpoint tensor, never a
        # second copy of the checkpoint; the selection bias stays float32 whatever the weights' dtype
        if name.endswith("e_score_correction_bias"):
            return torch.float32
        return dtype if stored.is_floating_point else stored

    state, _ = _read_hf_state(reader, expected, config.num_hidden_layers, dtype_of=dtype_of, read_extra=False)
    state.update(absent_in_v2)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(dtype)
    model.reset_buffers()
    model.hf_origin = origin_of(path, hf, reader, config.num_hidden_layers)
    if model.hf_origin.extra_keys:
        log.warning(
            "%s: %d tensor(s) of layers >= num_hidden_layers (%d) are multi-token-prediction modules; the "
            "core model does not use them (attach dsv3_lightning.plugins.mtp to load them): listed in "
            "model.hf_origin.extra_keys, read from %s when a head is attached, and written back by save_pretrained",
            path, len(model.hf_origin.extra_keys), config.num_hidden_layers, path,
        )  # fmt: skip
    return model


def save_pretrained(
    model: DeepSeekV3,
    path: str | os.PathLike,
    *,
    max_shard_size: int = 5 * 2**30,
    extra_state: Mapping[str, torch.Tensor] | None = None,
    model_type: str | None = None,
) -> None:
    """Writes ``config.json`` and safetensors shards (with an index when there are several).

    ``model_type`` (default: the family the model was loaded from, else deepseek_v3, or deepseek_v2
    for softmax routing) picks the config.json written; from the source's own config.json when the
    family is the source's. ``extra_state`` (default: the MTP tensors of the source checkpoint,
    ``model.hf_origin``) is written beside the model's own tensors under its checkpoint keys.
    """
    from safetensors.torch import save_file

    config = model.config
    origin = model.hf_origin
    family = model_type or (origin.model_type if origin is not None else default_family(config))
    base = origin.config if origin is not None and origin.model_type == family else None
    if config.scoring_func == "softmax":
        if config.norm_topk_prob or any(r.e_score_correction_bias.any() for r in model.routers()):
            raise ValueError(
                "softmax routing is exported as Hugging Face deepseek_v2, which has neither gate "
                "normalisation nor a selection bias: set model.config.norm_topk_prob to false and keep "
                "the bias at zero, or use scoring_func 'sigmoid'"
            )
    dtype = next(p.dtype for p in model.parameters())
    hf_config = config_to_hf(config, dtype=dtype, family=family, base=base)  # refuses before any write
    if extra_state is None:
        extra_state = origin.read_extra() if origin is not None else {}  # read before SRC may be overwritten
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = dict(unstack(model.state_dict()))
    if config.scoring_func == "softmax":
        tensors = {k: v for k, v in tensors.items() if not k.endswith("e_score_correction_bias")}
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
    # MTP modules are layers N.. N+D-1; transformers and DeepSeek read D from num_nextn_predict_layers
    extra_layers = extra_layer_indices(extra_state, config.num_hidden_layers)
    if extra_layers and hf_config.get("num_nextn_predict_layers") != len(extra_layers):
        hf_config["num_nextn_predict_layers"] = len(extra_layers)
    _atomic(path / CONFIG_NAME, lambda tmp: tmp.write_text(dumps(hf_config)))


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = [
    "CheckpointReader", "SUPPORTED_MODEL_TYPES", "HFOrigin", "config_from_hf", "config_to_hf", "extra_layer_indices", "load_pretrained",
    "read_config", "save_pretrained", "state_dict_to_hf",
]
