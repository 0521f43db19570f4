"""``dsv3 convert``: a Lightning checkpoint to a Hugging Face directory, and back.

    dsv3 convert runs/tiny/version_0/checkpoints/last.ckpt hf_dir/      # .ckpt -> Hugging Face
    dsv3 convert hf_dir/ model.ckpt                                      # Hugging Face -> .ckpt
    dsv3 convert deepseek_fp8_dir/ hf_dir/                               # FP8 blocks -> dequantized

.ckpt -> Hugging Face: the checkpoint is memory-mapped (``torch.load(mmap=True)``) and assigned into
a model built on the meta device, so no tensor is copied before it is written; safetensors shards of
``--max_shard_size`` follow ``save_pretrained``. Prediction heads export themselves through
``PredictionHead.hf_state_dict`` (MTP modules as layers ``num_hidden_layers + k``, with
``num_nextn_predict_layers`` in config.json), and the run's tokenizer becomes ``tokenizer.json``.

Hugging Face -> .ckpt: a weights-and-tokenizer checkpoint that ``dsv3 generate``, ``dsv3 validate
--ckpt_path`` and ``DSV3LightningModule.load_from_checkpoint`` open. MTP layers in the directory are
attached as ``--mtp_head`` (its class path; a YAML-style default, nothing here imports it). The model
is built on the meta device and each tensor is read into a file-backed buffer (experts one at a
time into their stacked tensor), so the process holds about one tensor at a time.

Hugging Face (DeepSeek's FP8 release, ``weight_scale_inv`` per 128x128 block) -> Hugging Face: the
FP8 plugin's dequantizer, shard by shard.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path

import torch

from dsv3_lightning.config import ModelConfig
from dsv3_lightning.heads import build_head
from dsv3_lightning.hf import config_from_hf, extra_layer_indices
from dsv3_lightning.loading import module_from_checkpoint


def _ckpt_to_hf(src: Path, dst: Path, max_shard_size: int) -> None:
    checkpoint = torch.load(src, map_location="cpu", weights_only=False, mmap=True)
    module = module_from_checkpoint(checkpoint, str(src))
    extra = {}
    for head in module.heads:
        extra.update(head.hf_state_dict(module.model))
    module.model.save_pretrained(dst, max_shard_size=max_shard_size, extra_state=extra)
    tokenizer = checkpoint.get("DSV3DataModule", {}).get("tokenizer_json")
    if tokenizer is not None:
        (dst / "tokenizer.json").write_text(tokenizer, encoding="utf-8")


def _hf_to_ckpt(src: Path, dst: Path, config: ModelConfig, mtp_head: str) -> None:
    """Streams: each tensor is read once into a file-backed buffer beside ``dst`` (so the kernel, not
    the process, holds the model), then ``torch.save`` copies the buffers into the checkpoint."""
    from dsv3_lightning.hf import _CheckpointReader, _read_hf_state
    from dsv3_lightning.module import DSV3LightningModule

    reader = _CheckpointReader(src)
    n = config.num_hidden_layers
    depth = len(extra_layer_indices(reader.weight_map, n))
    heads = [build_head({"class_path": mtp_head, "init_args": {"depth": depth}})] if depth else []
    with torch.device("meta"):
        module = DSV3LightningModule(config, heads)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        buffers = itertools.count()

        def file_backed(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
            numel = math.prod(shape)
            return torch.from_file(f"{tmp}/{next(buffers)}", shared=True, size=numel, dtype=dtype).view(shape)

        # the release repeats the embedding and output matrix in every MTP layer: the model's own serve
        copies = ("embed_tokens.weight", "shared_head.head.weight")
        state, extra = _read_hf_state(reader, module.model.state_dict(), n, allocate=file_backed,
                                      skip_extra=lambda key: key.endswith(copies))
        module.model.load_state_dict(state, strict=True, assign=True)
        module.model.reset_buffers()
        module.model.mtp_checkpoint_state = extra
        for head in module.heads:  # rebuilt on the CPU, from the MTP tensors just read
            head.attach(module.model)
        state_dict = module.state_dict()
        unfilled = [name for name, tensor in state_dict.items() if tensor.is_meta]
        if unfilled:
            raise RuntimeError(f"{src}: conversion left {len(unfilled)} tensor(s) unfilled, e.g. {unfilled[:3]}")
        checkpoint = {
            "state_dict": state_dict,
            "hyper_parameters": dict(module.hparams),
            "hparams_name": "kwargs",
            "pytorch-lightning_version": _lightning_version(),
        }
        if (src / "tokenizer.json").is_file():
            tokenizer = (src / "tokenizer.json").read_text(encoding="utf-8")
            checkpoint["DSV3DataModule"] = {"tokenizer_json": tokenizer, "vocab_size": config.vocab_size}
        partial = Path(tmp) / "checkpoint.ckpt"
        torch.save(checkpoint, partial)
        partial.replace(dst)


def _lightning_version() -> str:
    import lightning

    return lightning.__version__


def convert(src: str, dst: str, max_shard_size: int = 5 * 2**30,
            mtp_head: str = "dsv3_lightning.plugins.mtp.MultiTokenPrediction") -> None:
    """Convert between a Lightning checkpoint and a Hugging Face directory (the direction from SRC).

    Args:
        src: A .ckpt from dsv3 fit, or a Hugging Face DeepSeek-V3 directory (FP8 or not).
        dst: The Hugging Face directory to write (from a .ckpt or an FP8 directory), or the .ckpt to
            write (from a Hugging Face directory).
        max_shard_size: Bytes per safetensors shard when writing a Hugging Face directory.
        mtp_head: The prediction head class that takes a Hugging Face directory's MTP layers.
    """
    source, target = Path(src).expanduser(), Path(dst).expanduser()
    if source.is_file():
        if target.suffix == ".ckpt":
            raise ValueError(f"{dst}: converting a .ckpt gives a Hugging Face directory; name a directory")
        _ckpt_to_hf(source, target, max_shard_size)
    elif source.is_dir():
        config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else None
        if config is None:
            raise FileNotFoundError(f"{source}/config.json: missing; SRC must be a Hugging Face model directory")
        if config.get("quantization_config"):
            from dsv3_lightning.plugins.fp8.checkpoint import dequantize_checkpoint

            dequantize_checkpoint(source, target, dtype=torch.float32)
            return
        model_config = config_from_hf(config, source=str(source / "config.json"))  # refuses other architectures
        if target.suffix != ".ckpt":
            raise ValueError(f"{dst}: converting a Hugging Face directory gives a Lightning checkpoint; name a .ckpt file")
        _hf_to_ckpt(source, target, model_config, mtp_head)
    else:
        raise FileNotFoundError(f"{src}: no such checkpoint file or directory")


def main(argv: list[str]) -> None:
    from jsonargparse import CLI

    CLI(convert, args=argv)


__all__ = ["convert"]
