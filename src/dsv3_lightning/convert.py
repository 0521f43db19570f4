"""``dsv3 convert``: a Lightning checkpoint to a Hugging Face directory, and back.

    dsv3 convert runs/tiny/version_0/checkpoints/last.ckpt hf_dir/      # .ckpt -> Hugging Face
    dsv3 convert runs/ep/version_0/checkpoints/last.ckpt/ hf_dir/       # sharded directory -> Hugging Face
    dsv3 convert hf_dir/ model.ckpt                                      # Hugging Face -> .ckpt
    dsv3 convert deepseek_fp8_dir/ hf_dir/                               # FP8 blocks -> dequantized
    dsv3 convert last.ckpt hf_dir/ --overwrite                           # into a non-empty hf_dir/

.ckpt -> Hugging Face: the checkpoint is memory-mapped (``torch.load(mmap=True)``) and assigned into
a model built on the meta device, so no tensor is copied before it is written; safetensors shards of
``--max_shard_size`` follow ``save_pretrained``. Prediction heads export themselves through
``PredictionHead.hf_state_dict`` (MTP modules as layers ``num_hidden_layers + k``, with
``num_nextn_predict_layers`` in config.json), and the run's tokenizer becomes ``tokenizer.json``; a
fine-tuned run's chat template and its special tokens go into ``tokenizer_config.json``, where
transformers' ``apply_chat_template`` reads them (and back into a .ckpt the other way).

Sharded checkpoint directory (``sharded_checkpoint``: a distributed run's, told by its DCP metadata)
-> Hugging Face: the same, each model tensor assembled from its chunks into a file-backed buffer
beside DST, one at a time; the optimizer state is never read.

Hugging Face -> .ckpt: a weights-and-tokenizer checkpoint that ``dsv3 generate``, ``dsv3 validate
--ckpt_path`` and ``DSV3LightningModule.load_from_checkpoint`` open. MTP layers in the directory are
attached as ``--mtp_head`` (its class path; a YAML-style default, nothing here imports it). The model
is built on the meta device and each tensor is read into a file-backed buffer (experts one at a
time into their stacked tensor), so the process holds about one tensor at a time.

Hugging Face (DeepSeek's FP8 release, ``weight_scale_inv`` per 128x128 block) -> Hugging Face: the
core's dequantizer (hf_checkpoint.py), shard by shard, scales found through the index in whichever
shard; tensors that are not FP8 keep their stored dtype. FP8 -> .ckpt dequantizes block by block
while streaming each tensor into its file-backed buffer.

Every family hf_families.py lists is read (deepseek_v3, deepseek_v2, kimi_k2, kimi_k25's text model,
glm4_moe_lite); a model_type of another architecture is refused with that list.

DST is never overwritten by surprise: a non-empty DST directory, or an existing DST file, is refused
unless ``--overwrite`` is given (SRC itself always is). With it, DST's model files (``config.json``,
``tokenizer.json``, ``tokenizer_config.json``, ``model*.safetensors`` and the index) wait in a hidden
folder inside DST while the conversion writes; the ones it does not write again (the shards of a
larger model, the tokenizer or chat template of another run) are then deleted with the folder, so no
stale weight or tokenizer is read beside the new ones, and a failed conversion leaves them in the
folder and logs where. Other files are kept. One warning names what was replaced, removed and kept.
Every file written gets the mode a new file has under the umask (0644 under the usual 022), whichever
writer made it: safetensors' ``save_file`` leaves 0600.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer

from dsv3_lightning.config import ModelConfig
from dsv3_lightning.heads import build_head
from dsv3_lightning.hf import CONFIG_NAME, INDEX_FILE, config_from_hf, extra_layer_indices, new_file_mode, origin_of
from dsv3_lightning.data.chat import ChatTemplate, load_chat_template
from dsv3_lightning.loading import module_from_checkpoint
from dsv3_lightning.sharded_checkpoint import looks_sharded, resolve

log = logging.getLogger(__name__)

# What a conversion into a directory writes: the ones it did not write this time are stale.
TOKENIZER_CONFIG = "tokenizer_config.json"
_MODEL_FILES = (CONFIG_NAME, "tokenizer.json", TOKENIZER_CONFIG, INDEX_FILE, "model*.safetensors")


def _ckpt_to_hf(src: Path, dst: Path, max_shard_size: int, model_type: str | None = None) -> None:
    checkpoint = torch.load(src, map_location="cpu", weights_only=False, mmap=True)
    _checkpoint_to_hf(checkpoint, src, dst, max_shard_size, model_type)


def _sharded_to_hf(src: Path, dst: Path, max_shard_size: int, model_type: str | None = None) -> None:
    """The model tensors are assembled into file-backed buffers (as ``_hf_to_ckpt`` reads), so the
    process holds at most the one tensor being assembled, not the model."""
    from dsv3_lightning.sharded_checkpoint_io import read_lightning_checkpoint

    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        buffers = itertools.count()

        def file_backed(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
            numel = math.prod(shape)
            return torch.from_file(f"{tmp}/{next(buffers)}", shared=True, size=numel, dtype=dtype).view(shape)

        checkpoint = read_lightning_checkpoint(src, optimizer_states=False, allocate=file_backed)
        _checkpoint_to_hf(checkpoint, src, dst, max_shard_size, model_type)


def _checkpoint_to_hf(
    checkpoint: dict, src: Path, dst: Path, max_shard_size: int, model_type: str | None = None
) -> None:
    module = module_from_checkpoint(checkpoint, str(src))
    extra = {}
    for head in module.heads:
        extra.update(head.hf_state_dict(module.model))
    module.model.save_pretrained(dst, max_shard_size=max_shard_size, extra_state=extra, model_type=model_type)
    data_state = checkpoint.get("DSV3DataModule", {})
    tokenizer = data_state.get("tokenizer_json")
    if tokenizer is not None:
        (dst / "tokenizer.json").write_text(tokenizer, encoding="utf-8")
        if data_state.get("chat_template") is not None:  # a fine-tuned model: its chat template, for transformers
            chat = ChatTemplate.from_checkpoint(data_state, Tokenizer.from_str(tokenizer))
            config = json.dumps(chat.tokenizer_config(), indent=2, ensure_ascii=False)
            (dst / TOKENIZER_CONFIG).write_text(config + "\n", encoding="utf-8")


def _hf_to_ckpt(src: Path, dst: Path, config: ModelConfig, hf: dict, mtp_head: str) -> None:
    """Streams: each tensor is read once (FP8 dequantized block by block) into a file-backed buffer
    beside ``dst`` (so the kernel, not the process, holds the model), then ``torch.save`` copies the
    buffers into the checkpoint."""
    from dsv3_lightning.hf import CheckpointReader, _read_hf_state
    from dsv3_lightning.module import DSV3LightningModule

    reader = CheckpointReader(src, hf_config=hf)
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

        state, _ = _read_hf_state(reader, module.model.state_dict(), n, allocate=file_backed, read_extra=False)
        module.model.load_state_dict(state, strict=True, assign=True)
        module.model.reset_buffers()
        module.model.hf_origin = origin_of(src, hf, reader, n)
        for head in module.heads:  # rebuilt on the CPU, reading the MTP tensors from hf_origin
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
            if load_chat_template(src) is not None:  # a chat model: its template and special tokens
                chat = ChatTemplate.from_directory(src, Tokenizer.from_str(tokenizer))
                checkpoint["DSV3DataModule"].update(chat.checkpoint_state())
        partial = Path(tmp) / "checkpoint.ckpt"
        torch.save(checkpoint, partial)
        partial.replace(dst)


def _lightning_version() -> str:
    import lightning

    return lightning.__version__


def convert(
    src: str,
    dst: str,
    max_shard_size: int = 5 * 2**30,
    mtp_head: str = "dsv3_lightning.plugins.mtp.MultiTokenPrediction",
    overwrite: bool = False,
    model_type: Literal["deepseek_v3", "deepseek_v2", "kimi_k2", "glm4_moe_lite"] | None = None,
) -> None:
    """Convert between a Lightning checkpoint and a Hugging Face directory (the direction from SRC).

    Args:
        src: A .ckpt or a sharded checkpoint directory from dsv3 fit, or a Hugging Face directory of
            the family (deepseek_v3, deepseek_v2, kimi_k2, kimi_k25's text model, glm4_moe_lite; block
            FP8 or not).
        dst: The Hugging Face directory to write (from a .ckpt or an FP8 directory), or the .ckpt to
            write (from a Hugging Face directory).
        max_shard_size: Bytes per safetensors shard when writing a Hugging Face directory.
        mtp_head: The prediction head class that takes a Hugging Face directory's MTP layers.
        overwrite: Write into a non-empty DST directory (its model files are replaced, stale ones
            removed) or over an existing DST file; a warning names what was replaced, removed and kept.
        model_type: The Hugging Face family to write a Lightning checkpoint as (its config.json
            names and model_type); default deepseek_v3, or deepseek_v2 for softmax routing.
    """
    source, target = Path(src).expanduser(), Path(dst).expanduser()
    write = _plan(src, source, dst, target, max_shard_size, mtp_head, model_type)
    before = _inventory(target)
    if before and not overwrite:
        raise ValueError(_refusal(dst, target, before))
    with _replacing(dst, target, before):
        write()


def _plan(
    src: str, source: Path, dst: str, target: Path, max_shard_size: int, mtp_head: str, model_type: str | None = None
) -> Callable[[], None]:
    """Checks SRC and the kind of DST, and returns the conversion, not yet run."""
    sharded = looks_sharded(source)  # also a sharded SRC missing after an interrupted save (its .old)
    if not source.exists() and not sharded:
        raise FileNotFoundError(f"{src}: no such checkpoint file or directory")
    if target.exists() and target.resolve() == source.resolve():
        raise ValueError(f"{dst}: is SRC itself; name another DST")
    if source.is_file() or sharded:
        if target.suffix == ".ckpt" or target.is_file():
            what = "a sharded checkpoint" if sharded else "a .ckpt"
            raise ValueError(f"{dst}: converting {what} gives a Hugging Face directory; name a directory")
        if sharded:
            resolve(source)  # refuses an incomplete one now, before DST is touched
            return lambda: _sharded_to_hf(source, target, max_shard_size, model_type)
        return lambda: _ckpt_to_hf(source, target, max_shard_size, model_type)
    config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else None
    if config is None:
        raise FileNotFoundError(f"{source}/config.json: missing; SRC must be a Hugging Face model directory")
    if model_type is not None:
        raise ValueError(
            f"--model_type {model_type}: applies to a Lightning checkpoint written as Hugging Face; SRC {src} "
            f"is already a Hugging Face directory (model_type {config.get('model_type')!r})"
        )
    model_config = config_from_hf(config, source=str(source / "config.json"))  # refuses other architectures
    quantized = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if quantized and target.suffix != ".ckpt":
        from dsv3_lightning.hf_checkpoint import dequantize_checkpoint

        if target.is_file():
            raise ValueError(f"{dst}: dequantizing gives a Hugging Face directory; name a directory")
        return lambda: dequantize_checkpoint(source, target, dtype=torch.float32)
    if target.suffix != ".ckpt" or target.is_dir():
        raise ValueError(
            f"{dst}: converting a Hugging Face directory gives a Lightning checkpoint; name a .ckpt file"
        )
    return lambda: _hf_to_ckpt(source, target, model_config, config, mtp_head)


# ------------------------------------------------------------------------------------ DST guard
_Stamp = tuple[int, int, int] | None  # (inode, mtime_ns, size) of a file; None for a directory


def _inventory(target: Path) -> dict[Path, _Stamp]:
    """What is at ``target`` now: the entries of a directory, or the file itself."""
    entries = sorted(target.iterdir()) if target.is_dir() else [target] if target.exists() else []
    return {path: _stamp(path) for path in entries}


def _stamp(path: Path) -> _Stamp:
    st = path.stat()
    return (st.st_ino, st.st_mtime_ns, st.st_size) if path.is_file() else None


def _names(paths: list[Path], limit: int = 5) -> str:
    named = ", ".join(path.name for path in paths[:limit])
    return named + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _refusal(dst: str, target: Path, before: dict[Path, _Stamp]) -> str:
    if not target.is_dir():
        return f"{dst}: exists; pass --overwrite to replace it, or name another .ckpt file"
    return (
        f"{dst}: not empty ({len(before)} entries: {_names(list(before))}); dsv3 convert writes into a new "
        "or empty directory. Pass --overwrite to replace its model files, or name another directory"
    )


@contextlib.contextmanager
def _replacing(
    dst: str, target: Path, before: dict[Path, _Stamp], command: str = "dsv3 convert"
) -> Iterator[None]:
    """Around the conversion: DST's model files wait in a hidden folder inside DST, so that the ones
    the conversion does not write again are gone afterwards (a failed conversion leaves them there,
    and says so); then every file written gets the umask's mode, and a warning tells what changed."""
    models = [path for path in before if target.is_dir() and path.is_file() and _is_model_file(path)]
    aside = Path(tempfile.mkdtemp(prefix=".dsv3-convert-replaced-", dir=target)) if models else None
    for path in models:
        path.rename(aside / path.name)
    try:
        yield
    except BaseException:
        if aside is not None:
            log.error("%s %s failed: the model files it was replacing are in %s", command, dst, aside)
        raise
    if aside is not None:
        shutil.rmtree(aside)
    after = _inventory(target)
    written = [path for path, stamp in after.items() if stamp is not None and stamp != before.get(path)]
    for path in written:
        os.chmod(path, new_file_mode())
    if before:
        _report(dst, before, after, written, command)


def _is_model_file(path: Path) -> bool:
    return any(fnmatch.fnmatch(path.name, pattern) for pattern in _MODEL_FILES)


def _report(
    dst: str,
    before: dict[Path, _Stamp],
    after: dict[Path, _Stamp],
    written: list[Path],
    command: str = "dsv3 convert",
) -> None:
    replaced = [path for path in written if path in before]
    removed = [path for path in before if path not in after]
    kept = [path for path in before if path not in replaced and path not in removed]
    parts = [f"replaced {len(replaced)} file(s): {_names(replaced)}"]
    parts += [f"removed {len(removed)} stale: {_names(removed)}"] if removed else []
    parts += [f"kept {len(kept)} other: {_names(kept)}"] if kept else []
    log.warning("%s --overwrite %s: %s", command, dst, "; ".join(parts))


def main(argv: list[str]) -> None:
    """``dsv3 convert SRC DST [--overwrite]``: the arguments of :func:`convert`, ``overwrite`` a bare
    flag (jsonargparse's CLI would want ``--overwrite true``)."""
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="dsv3 convert", description=__doc__.split("\n")[0])
    parser.add_function_arguments(convert, skip={"overwrite"}, as_positional=True)
    parser.add_argument(
        "--overwrite", action=ActionYesNo, default=False,
        help="Write into a non-empty DST directory, or over an existing DST file, replacing its model files.",
    )  # fmt: skip
    convert(**parser.parse_args(argv).as_dict())


__all__ = ["convert"]
