"""Deterministic initialisation by name: every tensor drawn from its own generator, seeded by the
model's seed and the tensor's name.

Why: shard-first construction (materialize.py) builds the model on the meta device, lets a strategy
cut it (pipeline pieces, expert shards), and materialises only what a rank keeps. Those tensors must
hold exactly what a single-process model built with the same seed holds, whatever else exists on the
rank and in whatever order it is visited. One stream over all parameters (``nn.init`` in module
order) cannot give that; a generator per tensor, seeded from (seed, name), does.

Names are the tensors' Hugging Face checkpoint keys. A module may declare ``checkpoint_prefix``, the
key prefix of its tensors (``DeepSeekV3``: "", a ``DecoderLayer``: ``model.layers.{layer_idx}.``);
below it names extend by attribute as usual. So ``lm_head.weight`` is named alike in the bare model
and in the LightningModule (``model.lm_head.weight``), and a multi-token-prediction module, which is a
decoder layer numbered N + k as in the release, is ``model.layers.{N + k}.*`` wherever a head keeps
it. A layer's tensors then get the same values in a 2-layer and a 4-layer model. Tensors outside any
prefixed module are named relative to the module passed in: a prediction head that initialises its
own non-block tensors must pass itself (``model.init_weights(head)``), as materialisation does.

Distributions, as before this file (DeepSeek-V3, σ = ``initializer_range``): Normal(0, σ) for every
matrix (linear layers, the embedding, the router, each routed expert), ones for RMSNorm weights, zero
for the router's selection bias. Values are drawn in float32 on the CPU and copied into the tensor,
whatever its dtype and device, so a GPU rank or a bfloat16 model gets the bits of a CPU float32
model cast. Stacked routed experts (``GroupedExperts``) draw one generator per expert row, seeded by
(seed, name, global expert id) with id = ``expert_offset`` + row: a shard holding experts
offset .. offset + L gets exactly those rows of the full model.

The per-tensor seed is 8 bytes of BLAKE2b of ``"{seed}/{name}[/{expert}]"``: the same in every
process and Python version (``hash()`` is salted per process). Tensors on the meta device and empty
tensors (a pipeline rank's released parameters) are skipped. Parameters of module kinds without a
rule here keep what their constructor gave them (materialisation refuses them: a meta tensor has
no values to keep).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator

import torch
from torch import nn

from dsv3_lightning.model.moe import GroupedExperts
from dsv3_lightning.model.norm import RMSNorm
from dsv3_lightning.model.router import Router

_NORMAL = "normal"
_ONES = "ones"
_ZEROS = "zeros"


def draw_seed() -> int:
    """A model's init seed, one draw from torch's global CPU generator (so ``seed_everything`` sets it
    and ranks seeded alike agree); on the CPU explicitly, as a model may be built under a meta context."""
    return int(torch.randint(2**62, (), device="cpu"))


def tensor_seed(seed: int, name: str, expert: int | None = None) -> int:
    key = f"{seed}/{name}" if expert is None else f"{seed}/{name}/{expert}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _rule(owner: nn.Module, leaf: str) -> str | None:
    if isinstance(owner, GroupedExperts) and leaf in ("gate_up_proj", "down_proj"):
        return _NORMAL
    if isinstance(owner, (nn.Linear, nn.Embedding, Router)) and leaf == "weight":
        return _NORMAL
    if isinstance(owner, RMSNorm) and leaf == "weight":
        return _ONES
    if isinstance(owner, Router) and leaf == "e_score_correction_bias":
        return _ZEROS
    return None


def named_tensors(module: nn.Module) -> Iterator[tuple[str, str, nn.Module, str, torch.Tensor]]:
    """(qualified name, checkpoint name, owning module, attribute, tensor) for every parameter and
    buffer of ``module``, each once."""
    prefixes: dict[str, str] = {}
    seen: set[int] = set()
    for qualified, owner in module.named_modules():
        parent, _, attr = qualified.rpartition(".")
        prefix = getattr(owner, "checkpoint_prefix", None)
        if prefix is None:
            prefix = f"{prefixes[parent]}{attr}." if qualified else ""
        prefixes[qualified] = prefix
        for leaf, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield (f"{qualified}.{leaf}" if qualified else leaf), prefix + leaf, owner, leaf, tensor


def _normal_(tensor: torch.Tensor, std: float, seed: int) -> None:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous():
        tensor.normal_(0.0, std, generator=generator)
    else:
        drawn = torch.empty(tensor.shape, dtype=torch.float32, device="cpu")
        tensor.copy_(drawn.normal_(0.0, std, generator=generator))


@torch.no_grad()
def init_weights_(
    module: nn.Module, seed: int, *, std: float, only: Collection[str] | None = None
) -> list[str]:
    """Initialises ``module``'s tensors by name (``only``: just these qualified names); returns the
    qualified names initialised."""
    done = []
    for qualified, name, owner, leaf, tensor in named_tensors(module):
        rule = _rule(owner, leaf)
        if rule is None or tensor.is_meta or tensor.numel() == 0:
            continue
        if only is not None and qualified not in only:
            continue
        if rule == _ONES:
            tensor.fill_(1.0)
        elif rule == _ZEROS:
            tensor.zero_()
        elif isinstance(owner, GroupedExperts):
            for row in range(tensor.shape[0]):
                _normal_(tensor[row], std, tensor_seed(seed, name, owner.expert_offset + row))
        else:
            _normal_(tensor, std, tensor_seed(seed, name))
        done.append(qualified)
    return done


def is_stacked_experts(owner: nn.Module, leaf: str) -> bool:
    return isinstance(owner, GroupedExperts) and leaf in ("gate_up_proj", "down_proj")


__all__ = ["draw_seed", "init_weights_", "is_stacked_experts", "named_tensors", "tensor_seed"]
