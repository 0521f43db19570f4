"""Reading a Hugging Face safetensors checkpoint tensor by tensor: shards, key prefixes, block FP8.

``CheckpointReader`` gives random access to a single-file or index-sharded checkpoint under the
*text model's* keys (``model.layers.0.self_attn.q_a_proj.weight``): a multimodal family's prefix is
removed (hf_families.text_key) and the keys outside the text model are listed in ``left_out``.

Block FP8 (DeepSeek's and Kimi's releases): a quantized weight W [out, in] is stored as
``<name>.weight`` (float8_e4m3fn) and ``<name>.weight_scale_inv`` (float32,
[ceil(out/b0), ceil(in/b1)], ``quantization_config.weight_block_size`` [b0, b1], 128x128 in the
releases), real = fp8 * scale_inv block by block, edge blocks cropped. The scale is found through
``model.safetensors.index.json`` and may sit in another shard than its weight (the releases split
them so). ``get`` dequantizes a few block rows (b0 rows each) at a time from a safetensors slice
into the float32 result, so the extra memory of reading an FP8 tensor is bounded (``STEP_ELEMENTS``),
not a second copy of the weight in float32 beside its scale map. The values are those of
``fp8.float() * scale`` on the whole tensor, bit for bit. Tensors that are not FP8 come back in the dtype they are stored in
(the releases' bfloat16 weights, a float32 router or selection bias).

A weight stored as FP8 without its scale, a scale whose shape does not fit its weight, or a scale
without a weight is refused with the key and the fix.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dsv3_lightning.hf_families import text_key

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


STEP_ELEMENTS = 2**24
"""Elements dequantized per step (64 MiB of float32): whole block rows, at least one."""


def dequantize_blocks(
    weight: Any, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), *, key: str = "weight"
) -> torch.Tensor:
    """float32 ``weight * scale_inv`` block by block, a few whole block rows of ``weight`` read at a time.

    ``weight`` is an FP8 tensor or a safetensors slice of one (read lazily, ``weight[i:j]``). Each step
    reads as many block rows as fit ``STEP_ELEMENTS`` (at least one), so the temporaries are bounded
    whatever the tensor's size, and few steps keep the per-op overhead low on small CPUs.
    """
    rows, cols = weight.get_shape() if hasattr(weight, "get_shape") else weight.shape
    b0, b1 = block
    expected = (math.ceil(rows / b0), math.ceil(cols / b1))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"{key}{SCALE_SUFFIX} has shape {tuple(scale_inv.shape)} but {key} [{rows}, {cols}] in {b0}x{b1} "
            f"blocks needs {expected}; quantization_config.weight_block_size does not match the checkpoint"
        )
    out = torch.empty(rows, cols, dtype=torch.float32)
    scale = scale_inv.float().repeat_interleave(b1, dim=1)[:, :cols]  # [row blocks, cols]: small
    per_step = max(1, STEP_ELEMENTS // max(1, b0 * cols))
    for first in range(0, expected[0], per_step):
        start, stop = first * b0, min((first + per_step) * b0, rows)
        row_scale = scale[first : first + per_step].repeat_interleave(b0, dim=0)[: stop - start]
        torch.mul(weight[start:stop].float(), row_scale, out=out[start:stop])
    return out


class CheckpointReader:
    """Random access to the tensors of a checkpoint directory (the module docstring).

    ``weight_map`` maps each readable key (the text model's, scales not listed) to its shard;
    ``left_out`` lists the stored keys outside the text model. ``raw=True`` keeps the stored keys
    (prefixes and all), for a conversion that rewrites the whole directory.
    """

    def __init__(self, path: str | os.PathLike, *, hf_config: Mapping[str, Any] | None = None, raw: bool = False):
        from safetensors import safe_open

        path = Path(path)
        if (path / INDEX_FILE).is_file():
            stored = read_json(path / INDEX_FILE)["weight_map"]
            files = sorted(set(stored.values()))
        elif (path / SINGLE_FILE).is_file():
            files, stored = [SINGLE_FILE], None
        else:
            raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face model directory?")
        self._handles = {}
        for file in files:
            try:
                self._handles[file] = safe_open(str(path / file), framework="pt")
            except Exception as err:  # safetensors raises its own error types for truncated headers
                raise ValueError(f"{path / file}: unreadable safetensors file ({err}); re-download or re-save it") from err
        if stored is None:
            stored = {key: SINGLE_FILE for key in self._handles[SINGLE_FILE].keys()}
        if hf_config is None:
            hf_config = read_json(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else {}
        quant = hf_config.get("quantization_config") or (hf_config.get("text_config") or {}).get("quantization_config")
        self.block = tuple((quant or {}).get("weight_block_size") or (128, 128))
        self.path = path
        self.stored_map: dict[str, str] = stored
        """Every stored key (scales too) -> its shard, as the index lists them."""
        self.weight_map: dict[str, str] = {}
        self._stored_key: dict[str, str] = {}
        self.left_out: list[str] = []
        model_type = None if raw else hf_config.get("model_type")
        for key, file in stored.items():
            if key.endswith(SCALE_SUFFIX):
                weight = key.removesuffix(SCALE_SUFFIX)
                if weight not in stored:
                    raise ValueError(f"{path}: {key} scales no tensor ({weight} is in no shard); the checkpoint is corrupt")
                continue
            name = text_key(model_type, key)
            if name is None:
                self.left_out.append(key)
                continue
            self.weight_map[name] = file
            self._stored_key[name] = key

    @property
    def quantized(self) -> bool:
        return any(key.endswith(SCALE_SUFFIX) for key in self.stored_map)

    def dtype(self, key: str) -> torch.dtype | str:
        """The stored dtype of ``key`` (float32 for an FP8 weight with a scale: what ``get`` returns)."""
        stored = self._stored_key[key]
        if stored + SCALE_SUFFIX in self.stored_map:
            return torch.float32
        name = self._handles[self.weight_map[key]].get_slice(stored).get_dtype()
        return FP8_DTYPES.get(name, name)

    def get(self, key: str) -> torch.Tensor:
        stored = self._stored_key[key]
        file = self.weight_map[key]
        try:
            handle = self._handles[file]
            scale_key = stored + SCALE_SUFFIX
            if scale_key in self.stored_map:  # through the index: any shard
                scale = self._handles[self.stored_map[scale_key]].get_tensor(scale_key)
                return dequantize_blocks(handle.get_slice(stored), scale, self.block, key=stored)
            dtype = handle.get_slice(stored).get_dtype()
            if dtype in FP8_DTYPES:
                raise ValueError(
                    f"{self.path}: {stored} is stored as {FP8_DTYPES[dtype]} but {scale_key} is in no shard "
                    f"({INDEX_FILE if (self.path / INDEX_FILE).is_file() else SINGLE_FILE} lists none); the "
                    "checkpoint is incomplete: re-download its shards and index"
                )
            return handle.get_tensor(stored)
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(f"{self.path / file}: cannot read {stored!r} ({err}); the file is corrupt") from err


def dequantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> None:
    """Writes ``dst``: ``src`` with every FP8 weight dequantized to ``dtype`` and its scale dropped.

    Shard by shard, under the same shard names and keys; tensors that are not FP8 keep their stored
    dtype. ``quantization_config`` leaves config.json (and its text_config). Other files (tokenizer
    ...) are copied. Every file written gets the umask's mode.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    reader = CheckpointReader(src, raw=True)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total, written = {}, 0, []
    for shard in sorted(set(reader.stored_map.values())):  # one output shard in memory at a time
        tensors = {}
        for key in (k for k, f in reader.weight_map.items() if f == shard):
            fp8 = key + SCALE_SUFFIX in reader.stored_map
            tensors[key] = reader.get(key).to(dtype) if fp8 else reader.get(key)
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
        written.append(dst / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if (src / INDEX_FILE).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        written.append(dst / INDEX_FILE)
    config = read_json(src / CONFIG_NAME)
    for part in (config, config.get("text_config") or {}):
        part.pop("quantization_config", None)
    dtype_key = "torch_dtype" if "torch_dtype" in config else "dtype"
    config[dtype_key] = str(dtype).removeprefix("torch.")
    (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    written.append(dst / CONFIG_NAME)
    for extra in src.iterdir():  # tokenizer files and the like
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (CONFIG_NAME, INDEX_FILE):
            shutil.copy(extra, dst / extra.name)
            written.append(dst / extra.name)
    for path in written:
        os.chmod(path, new_file_mode())


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


__all__ = ["CheckpointReader", "dequantize_blocks", "dequantize_checkpoint", "new_file_mode"]

