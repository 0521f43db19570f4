"""DeepSeek's FP8 checkpoint format: weights in E4M3 with a ``weight_scale_inv`` per 128x128 block.

The released DeepSeek-V3 weights store each quantized linear weight W [out, in] as
``<name>.weight`` (float8_e4m3fn) and ``<name>.weight_scale_inv`` (float32, [⌈out/128⌉, ⌈in/128⌉]),
with real = fp8 · scale_inv block by block (edge blocks cropped), and declare
``quantization_config: {quant_method: fp8, weight_block_size: [128, 128], ...}`` in config.json.

``dequantize_checkpoint(src, dst)`` writes a plain Hugging Face directory (FP8 weights in bfloat16
or float32, every other tensor in its stored dtype, no scale tensors, no quantization_config), shard
by shard; it is the core's (``dsv3_lightning.hf_checkpoint``), which ``DeepSeekV3.from_pretrained``
also uses to read FP8 checkpoints directly. ``quantize_checkpoint(src, dst)`` writes the FP8 format from a plain directory (our own
round trip, and FP8 deployment of a model trained here). Every file written gets the mode a new
file has under the umask (``dsv3_lightning.hf.new_file_mode``; safetensors' ``save_file`` alone leaves
0600). As a command:

    python -m dsv3_lightning.plugins.fp8.checkpoint dequantize SRC DST [--dtype bfloat16] [--overwrite]
    python -m dsv3_lightning.plugins.fp8.checkpoint quantize SRC DST [--overwrite]

The command guards DST as ``dsv3 convert`` does, with its code: a non-empty DST directory is refused
unless ``--overwrite`` is given; with it, DST's model files are set aside while the conversion
writes, those it does not write again (stale shards, another model's tokenizer) are removed, and one
warning names what was replaced, removed and kept. ``dsv3 convert FP8_DIR DST`` is the same
dequantization in float32.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from dsv3_lightning.plugins.fp8.quant import block_scales, quantize_blocks
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3_lightning.hf import new_file_mode
from dsv3_lightning.hf_checkpoint import dequantize_blocks
from dsv3_lightning.hf_checkpoint import dequantize_checkpoint as core_dequantize

SCALE_SUFFIX = "_scale_inv"
_COMMAND = "python -m dsv3_lightning.plugins.fp8.checkpoint"
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def dequantize_weight(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """float32 W from its FP8 values and per-block dequantization multipliers (the core's, a few
    block rows at a time)."""
    return dequantize_blocks(weight, scale_inv, (block, block))


def _shards(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def _convert(src: Path, dst: Path, convert, edit_config) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total, written = {}, 0, []
    for shard in _shards(src):  # one shard in memory at a time
        with safe_open(str(src / shard), framework="pt") as f:
            tensors = convert({key: f.get_tensor(key) for key in f.keys()})
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
        written.append(dst / shard)
        weight_map.update({key: shard for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if (src / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        written.append(dst / "model.safetensors.index.json")
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(config), indent=2))
    written.append(dst / "config.json")
    for extra in src.iterdir():  # tokenizer files and the like
        if extra.is_file() and extra.suffix not in (".safetensors",) and extra.name not in (
            "config.json", "model.safetensors.index.json"
        ):
            shutil.copy(extra, dst / extra.name)  # copies SRC's mode too
            written.append(dst / extra.name)
    for path in written:
        os.chmod(path, new_file_mode())


def dequantize_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Writes ``dst``: every FP8 weight of ``src`` times its block scales, in ``dtype``.

    The core's dequantizer (``dsv3_lightning.hf_checkpoint``): scales found through the index in
    whichever shard, a few block rows at a time; tensors that are not FP8 keep their stored dtype.
    """
    core_dequantize(src, dst, dtype=dtype)


def quantize_checkpoint(src: str | Path, dst: str | Path, *, pattern: str = "model.layers.") -> None:
    """Writes ``dst`` in DeepSeek's FP8 format: 2-D linear weights of the layers in 128x128 blocks.

    Like the release: the embedding, ``lm_head``, norms, routers (``mlp.gate``) and biases stay as they are.
    """
    src, dst = Path(src), Path(dst)

    def eligible(key: str, tensor: torch.Tensor) -> bool:
        return (
            key.startswith(pattern) and key.endswith(".weight") and tensor.dim() == 2
            and not key.endswith("mlp.gate.weight") and "norm" not in key
        )

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, tensor in tensors.items():
            if eligible(key, tensor):
                q = quantize_blocks(tensor.float())
                out[key] = q.q[:, : tensor.shape[1]].contiguous()
                out[key + SCALE_SUFFIX] = block_scales(q).contiguous()
            else:
                out[key] = tensor
        return out

    def edit(config: dict) -> dict:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
        return config

    _convert(src, dst, convert, edit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=_COMMAND, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["dequantize", "quantize"])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--overwrite", action="store_true",
        help="Write into a non-empty DST directory: replace its model files, remove stale ones.",
    )
    args = parser.parse_args(argv)
    if args.action == "dequantize":
        write = functools.partial(dequantize_checkpoint, args.src, args.dst, getattr(torch, args.dtype))
    else:
        write = functools.partial(quantize_checkpoint, args.src, args.dst)
    _guarded(args.action, args.src, args.dst, args.overwrite, write)


def _guarded(action: str, src: Path, dst: Path, overwrite: bool, write: Callable[[], None]) -> None:
    """Runs ``write`` inside ``dsv3 convert``'s DST guard (the module docstring), after its refusals."""
    from dsv3_lightning.convert import _inventory, _names, _replacing

    verb = {"dequantize": "dequantizing", "quantize": "quantizing"}[action]
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: is SRC itself; name another DST")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: {verb} gives a Hugging Face directory; name a directory")
    before = _inventory(dst)
    if before and not overwrite:
        raise ValueError(
            f"{dst}: not empty ({len(before)} entries: {_names(list(before))}); {_COMMAND} {action} writes "
            "into a new or empty directory. Pass --overwrite to replace its model files, or name another "
            "directory"
        )
    with _replacing(str(dst), dst, before, command=f"{_COMMAND} {action}"):
        write()


if __name__ == "__main__":
    main()
