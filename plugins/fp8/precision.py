"""FP8Precision: a Lightning Precision plugin that runs the model's linear GEMMs in FP8.

``convert_module`` swaps, by name, every eligible layer for its FP8 twin that shares the same
Parameter (so optimizers, checkpoints and the Hugging Face converter see no difference):

- converted: attention projections (q_a_proj, q_b_proj or q_proj, kv_a_proj_with_mqa, kv_b_proj,
  o_proj), dense and shared-expert MLPs (gate_proj, up_proj, down_proj), every other ``nn.Linear``
  (e.g. MTP's eh_proj), and the routed experts through the grouped-matmul seam;
- never converted (SPEC.md §6.1): the embedding and the output head ``lm_head`` (not linear layers
  here / excluded by name), the router (``mlp.gate``, its own module), the norms and the attention
  core (SDPA), plus any name matching ``exclude``.

Dimensions that are not a multiple of 128 (blockwise) are zero-padded inside the quantizers
(``unaligned: pad``, exact: zeros add nothing) or left in float32 with a warning (``unaligned: skip``).
The rest of the model keeps the Trainer's precision (float32 on CPU); ``FP8Precision`` replaces a
``precision=`` setting, like Lightning's own TransformerEnginePrecision.

Backends: ``torch`` (portable emulation with real float8 tensors, CPU or GPU), ``scaled_mm``
(``torch._scaled_mm``; rowwise and tensorwise), ``triton`` (block-scaled kernels, CUDA) and ``auto``,
which takes ``triton`` for blockwise on CUDA, ``scaled_mm`` for the others on CUDA, else ``torch``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from typing import Literal, get_args

import torch
from dsv3_lightning.plugins.fp8.experts import FP8GroupedExperts
from dsv3_lightning.plugins.fp8.linear import FP8Linear, saved_bytes
from dsv3_lightning.plugins.fp8.recipes import FP8Recipe, Recipe
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from dsv3_lightning.model.moe import GroupedExperts

log = logging.getLogger(__name__)
_KEY = "trainer.plugins[FP8Precision]"
Backend = Literal["auto", "torch", "scaled_mm", "triton"]
"""Where the FP8 GEMMs run (``--help`` lists them): ``auto`` picks triton on a GPU for blockwise."""
BACKENDS: tuple[str, ...] = get_args(Backend)
NEVER_CONVERTED = ("lm_head", "*.lm_head", "*embed_tokens*", "*.mlp.gate")


class FP8Precision(Precision):
    """Runs every eligible linear layer's three GEMMs in FP8 E4M3 (see the module docstring).

    Args:
        recipe: ``blockwise`` (DeepSeek-V3: 1x128 activation tiles, 128x128 weight blocks),
            ``rowwise`` or ``tensorwise``.
        backend: ``auto``, ``torch``, ``scaled_mm`` or ``triton``.
        pow2_scales: Round every scale up to a power of two.
        unaligned: ``pad`` or ``skip`` layers whose dimensions are not multiples of 128 (blockwise).
        exclude: Extra module-name patterns (fnmatch) to keep in high precision.
    """

    def __init__(
        self,
        recipe: Recipe = "blockwise",
        *,
        backend: Backend = "auto",
        pow2_scales: bool = False,
        unaligned: Literal["pad", "skip"] = "pad",
        exclude: list[str] | None = None,
    ) -> None:
        self.recipe = self.build_recipe(recipe, pow2_scales=pow2_scales)
        if unaligned not in ("pad", "skip"):
            raise ValueError(f"{_KEY}.unaligned ({unaligned!r}) must be 'pad' or 'skip'")
        self.backend = resolve_backend(backend, self.recipe)
        self.unaligned = unaligned
        self.exclude = tuple(exclude or ())
        self.converted: list[str] = []
        self.skipped: list[str] = []
        self.in_features: dict[str, tuple[int, ...]] = {}

    def build_recipe(self, recipe: str, *, pow2_scales: bool) -> FP8Recipe:
        """The extension point for another recipe: the ``FP8Recipe`` every converted layer uses.

        Called once from ``__init__`` (before the backend is resolved) with the ``recipe`` and
        ``pow2_scales`` arguments. Override it in a subclass to return a subclass of ``FP8Recipe``
        (another tile or block size, another scaling rule); its ``activation`` and ``weight`` methods
        quantize the two operands of every GEMM along the same K-block width ``block``.
        """
        return FP8Recipe(recipe, pow2_scales=pow2_scales)

    def _aligned(self, *dims: int) -> bool:
        return self.recipe.name != "blockwise" or all(d % self.recipe.block == 0 for d in dims)

    def convert_module(self, module: nn.Module) -> nn.Module:
        self.converted, self.skipped = [], []
        replacements: list[tuple[str, nn.Module]] = []
        for name, child in module.named_modules():
            if isinstance(child, (FP8Linear, FP8GroupedExperts)):
                continue
            if isinstance(child, nn.Linear):
                dims = (child.in_features, child.out_features)
                factory = lambda c=child: FP8Linear.from_linear(c, self.recipe, self.backend)
            elif isinstance(child, GroupedExperts):
                dims = tuple(child.gate_up_proj.shape[1:]) + tuple(child.down_proj.shape[1:])
                factory = lambda c=child: FP8GroupedExperts.from_experts(c, self.recipe, self.backend)
            else:
                continue
            if any(fnmatch.fnmatch(name, p) for p in NEVER_CONVERTED + self.exclude):
                self.skipped.append(name)
            elif not self._aligned(*dims) and self.unaligned == "skip":
                rank_zero_warn(f"FP8Precision: {name} has dimensions {dims}, not multiples of 128: kept in high precision")
                self.skipped.append(name)
            else:
                replacements.append((name, factory()))
        if not replacements:
            raise ValueError(
                f"{_KEY}: the model has no linear layer to convert to FP8 (skipped: {self.skipped or 'none'}); "
                "remove the plugin or relax its exclude patterns"
            )
        for name, new in replacements:
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
            self.converted.append(name)
        total = len(self.converted) + len(self.skipped)
        self.in_features = {name: new_in_features(new) for name, new in replacements}
        fp8, fp32 = (sum(col) for col in zip(*(row[1:] for row in self.saved_activation_report(1))))
        rank_zero_info(
            f"FP8Precision ({self.recipe.name}, backend {self.backend}): converted {len(self.converted)}/{total} "
            f"linear layers, skipped {len(self.skipped)}: {', '.join(self.skipped) or 'none'}. Inputs saved for "
            f"backward: {fp8} bytes per token in FP8 against {fp32} in float32 ({fp32 / fp8:.2f}x less)"
        )
        log.debug("FP8Precision converted: %s", ", ".join(self.converted))
        return module


    def saved_activation_report(self, tokens: int) -> list[tuple[str, int, int]]:
        """(layer, bytes saved for backward in FP8, bytes a float32 layer would save) for ``tokens`` rows.

        The input of each converted GEMM is what a linear layer keeps for its weight gradient; routed
        experts count once per routed token copy for each of their two GEMMs (gate_up, down).
        """
        return [
            (name, sum(saved_bytes(tokens, k, self.recipe) for k in ks), sum(4 * tokens * k for k in ks))
            for name, ks in self.in_features.items()
        ]


def new_in_features(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, FP8GroupedExperts):
        return (module.gate_up_proj.shape[2], module.down_proj.shape[2])
    return (module.in_features,)


def resolve_backend(backend: str, recipe: FP8Recipe) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{_KEY}.backend ({backend!r}) must be one of {', '.join(BACKENDS)}")
    cuda = torch.cuda.is_available()
    if backend == "auto":
        if not cuda:
            return "torch"
        return "triton" if recipe.name == "blockwise" and _triton_available() else (
            "scaled_mm" if recipe.name != "blockwise" else "torch"
        )
    if backend == "triton" and not (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(
            f"{_KEY}.backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for a slow CPU check); "
            "use backend: torch (or auto) on CPU"
        )
    if backend == "triton" and not _triton_available():
        raise ValueError(f"{_KEY}.backend 'triton' needs the triton package: pip install triton")
    if backend == "triton" and recipe.name != "blockwise":
        raise ValueError(f"{_KEY}.backend 'triton' implements the blockwise recipe; use scaled_mm or torch for {recipe.name}")
    if backend == "scaled_mm" and recipe.name == "blockwise":
        raise ValueError(f"{_KEY}.backend 'scaled_mm' takes one scale per row; use triton or torch for blockwise")
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
