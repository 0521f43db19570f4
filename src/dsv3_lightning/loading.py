"""Opening a trained model for inference or conversion, from either format people hold.

- a Lightning checkpoint (``.ckpt`` from ``dsv3 fit``): the model, its prediction heads (rebuilt from
  the checkpoint's hyperparameters, so MTP modules come back) and the tokenizer the run trained,
  which the data module stores in every checkpoint, with the chat template of a fine-tuning run;
- a sharded checkpoint directory (a distributed ``dsv3 fit``; ``sharded_checkpoint``), told from a
  Hugging Face directory by its DCP files: the same, its model tensors assembled one at a time and its
  optimizer state never read;
- a Hugging Face directory (config.json + safetensors) of any family hf_families.py lists, block
  FP8 included: the model (``model.hf_origin`` lists the MTP tensors it leaves on disk), and
  ``tokenizer.json`` and the chat template (``chat_template.jinja`` or ``tokenizer_config.json``'s)
  when the directory has them.

Anything else is refused with a message that says what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from dsv3_lightning.data.chat import ChatTemplate
from dsv3_lightning.heads import PredictionHead
from dsv3_lightning.model.transformer import DeepSeekV3
from dsv3_lightning.sharded_checkpoint import looks_sharded
from dsv3_lightning.tokenizer import load_tokenizer, tokenizer_from_str


@dataclass
class LoadedModel:
    model: DeepSeekV3
    heads: list[PredictionHead] = field(default_factory=list)
    tokenizer: Tokenizer | None = None
    source: str = ""
    chat: ChatTemplate | None = None
    """How conversations are written for the model (a fine-tuned one's), or None."""


def module_from_checkpoint(checkpoint: dict, source: str, heads: list[PredictionHead] | None = None):
    """The DSV3LightningModule a loaded ``.ckpt`` dict describes, its tensors assigned, not copied.

    Built on the meta device from the checkpoint's hyperparameters (``heads`` replaces the heads they
    describe), then every tensor is the checkpoint's own (memory-mapped when the checkpoint was loaded
    with ``mmap=True``), so opening or converting a model costs no second copy of it.
    """
    from dsv3_lightning.module import DSV3LightningModule

    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{source}: not a Lightning checkpoint (no 'state_dict'); pass a .ckpt written by dsv3 fit")
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    if "config" not in hparams or not any(k.startswith("model.model.embed_tokens") for k in checkpoint["state_dict"]):
        raise ValueError(
            f"{source}: a Lightning checkpoint of another architecture (no DeepSeek-V3 model.config and "
            "model.model.* weights); pass a checkpoint written by dsv3 fit"
        )
    if heads is None and "heads" not in hparams and any(k.startswith("heads.") for k in checkpoint["state_dict"]):
        raise ValueError(
            f"{source} holds prediction-head weights but not the heads' arguments (written before they were "
            "saved with the hyperparameters); pass the heads, e.g. load_trained(path, heads=[MultiTokenPrediction(1)])"
        )
    if heads is not None:
        hparams["heads"] = heads
    with torch.device("meta"):
        module = DSV3LightningModule.from_hparams(hparams)
    module.load_state_dict(checkpoint["state_dict"], strict=True, assign=True)
    module.model.reset_buffers()
    device = module.model.lm_head.weight.device
    for part in module.heads.modules():  # the heads' derived buffers (their routers' step counts)
        if hasattr(part, "reset_buffers"):
            part.reset_buffers(device)
    return module


def load_lightning_checkpoint(path: Path, heads: list[PredictionHead] | None = None) -> LoadedModel:
    """A ``.ckpt`` file, or a sharded checkpoint directory."""
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    else:
        from dsv3_lightning.sharded_checkpoint_io import read_lightning_checkpoint

        checkpoint = read_lightning_checkpoint(path, optimizer_states=False)
    module = module_from_checkpoint(checkpoint, str(path), heads)
    module.to(torch.get_default_dtype())  # as a module built for training would hold them
    data_state = checkpoint.get("DSV3DataModule", {})
    tokenizer = None
    if "tokenizer_json" in data_state:
        tokenizer = tokenizer_from_str(data_state["tokenizer_json"], source=f"{path}'s tokenizer", require_eos=False)
    chat = ChatTemplate.from_checkpoint(data_state, tokenizer)
    return LoadedModel(module.model.eval(), [h.eval() for h in module.heads], tokenizer, str(path), chat)


def load_hf_directory(path: Path) -> LoadedModel:
    model = DeepSeekV3.from_pretrained(path).eval()
    file = path / "tokenizer.json"
    tokenizer = load_tokenizer(file, require_eos=False) if file.is_file() else None
    return LoadedModel(model, [], tokenizer, str(path), ChatTemplate.from_directory(path, tokenizer))


def load_trained(
    path: str | Path, *, tokenizer_path: str | Path | None = None, heads: list[PredictionHead] | None = None
) -> LoadedModel:
    """A Lightning ``.ckpt``, a sharded checkpoint directory or a Hugging Face directory; ``tokenizer_path``
    overrides its tokenizer, and ``heads`` the prediction heads a checkpoint's hyperparameters describe."""
    path = Path(path).expanduser()
    if path.is_file() or looks_sharded(path):  # looks_sharded: a complete one, its .old fallback, or not
        loaded = load_lightning_checkpoint(path, heads)
    elif path.is_dir():
        loaded = load_hf_directory(path)
    else:
        raise FileNotFoundError(
            f"{path}: no such checkpoint file, sharded checkpoint or Hugging Face directory"
        )
    if tokenizer_path is not None:
        loaded.tokenizer = load_tokenizer(tokenizer_path, require_eos=False)
    return loaded


__all__ = ["LoadedModel", "load_trained", "module_from_checkpoint"]
