"""Activations of one micro-batch per pipeline piece, and how many a schedule keeps at once.

**Per piece** (``PieceActivations``): the real ``PipelinePiece`` (partition.py) of an unsharded
module built on the meta device in the compute dtype runs one forward on a meta micro-batch
``[micro_batch, seq_len + 1 + extra_tokens]`` under ``saved_tensors_hooks``: the count is the distinct
storages autograd saves (probe.py), parameters and buffers left out, plus the piece's input hidden
state (not the first piece) and its output (not the last), which torch.distributed.pipelining's stage
keeps for the backward of each micro-batch in flight. The first piece embeds the tokens; the last
runs the final norm, ``lm_head`` and the module's ``batch_loss`` (main CE and the heads, MTP
included). Routing is whatever the meta run does with the router's real code; the expert matmuls see
T·K token copies, which is what each rank receives under expert parallelism when the load is
balanced (the all-to-all dispatcher's own index tensors, a few bytes per copy, are not counted).
Attention is counted as a GPU's fused kernel keeps it (probe.FusedAttention) unless ``attention`` is
"math". ``recompute=True`` switches on the module's ``recompute_activations`` (DecoderLayer's
``set_recomputation``: RMSNorm and MLA up-projections recomputed in backward, DeepSeek-V3's trick).

Not counted: autocast's cached low-precision weight copies (bf16-mixed keeps one per linear weight
for the whole step), the gradients of activations during backward, the all-to-all receive buffers,
and FP8 activation storage (FP8Precision saves FP8 inputs; the count uses the compute dtype).

**In flight** (``peak_activations``): the rank's own compute actions from the schedule's real plan
(``build_plan``: torch's ScheduleDualPipeV lists, ours for 1F1B and DualPipe) are replayed in order
with the simulator's rule (simulator.py), reproduced here with bytes instead of units: a forward of
stage s adds stage s's piece's bytes, a full backward (B) frees them, an input backward (I) keeps
them until its weight backward (W); an overlapped (F;B) pair counts its forward first. The peak of
that running sum is the rank's activation memory.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from dsv3_lightning.plugins.dualpipe.partition import PipelinePiece
from dsv3_lightning.plugins.dualpipe.plans import SchedulePlan
from dsv3_lightning.plugins.dualpipe.torch_pipelining import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
)

from dsv3_lightning.model.transformer import DecoderLayer
from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.plugins.plan.probe import FusedAttention, MetaRun, saved_storages, storage_bytes, storage_key


class PieceActivations:
    """Bytes of one micro-batch's activations per piece of a meta module (see the module docstring).

    ``module`` must live on the meta device, unsharded, in the dtype activations are computed in; it
    is used for counting only (its routers' statistics change, nothing else).
    """

    def __init__(
        self, module: DSV3LightningModule, micro_batch: int, seq_len: int, *, attention: str = "fused"
    ) -> None:
        if attention not in ("fused", "math"):
            raise ValueError(f"attention ({attention!r}) must be 'fused' (a GPU's kernel) or 'math'")
        self.module, self.micro_batch, self.seq_len, self.attention = module, micro_batch, seq_len, attention
        self._cache: dict[tuple[int, int, bool, bool, bool], int] = {}

    def set_recompute(self, enabled: bool) -> None:
        for layer in self.module.modules():
            if isinstance(layer, DecoderLayer):
                layer.set_recomputation(enabled)

    def piece_bytes(self, layers: tuple[int, int], is_first: bool, is_last: bool, *, recompute: bool) -> int:
        key = (*layers, is_first, is_last, recompute)
        if key not in self._cache:
            self.set_recompute(recompute)
            self._cache[key] = self._measure(_piece(self.module, layers, is_first, is_last))
        return self._cache[key]

    def _measure(self, piece: PipelinePiece) -> int:
        m, c = self.module, self.module.config
        tokens = torch.zeros(
            self.micro_batch, self.seq_len + 1 + m.extra_tokens, dtype=torch.long, device="meta"
        )
        dtype = m.model.model.embed_tokens.weight.dtype
        x = torch.empty(
            self.micro_batch, self.seq_len, c.hidden_size, dtype=dtype, device="meta", requires_grad=True
        )
        exclude = [*m.parameters(), *m.buffers()]
        kept: dict[int, int] = {}  # the stage's own input and output, kept per micro-batch in flight

        def forward() -> torch.Tensor:
            out = piece(x, tokens)
            for t in ([] if piece.is_first else [x]) + ([] if piece.is_last else [out]):
                kept[storage_key(t)] = storage_bytes(t)
            return out

        with MetaRun(), FusedAttention() if self.attention == "fused" else nullcontext():
            saved = saved_storages(forward, exclude)
        piece.logs.clear()
        return sum({**saved, **kept}.values())


def _piece(
    module: DSV3LightningModule, layers: tuple[int, int], is_first: bool, is_last: bool
) -> PipelinePiece:
    """The real ``PipelinePiece`` for ``layers``; its index only decides first / last."""
    num_pieces = 1 if is_first and is_last else 2 if is_first or is_last else 3
    index = 0 if is_first else num_pieces - 1 if is_last else 1
    return PipelinePiece(module, index, layers, num_pieces)


def peak_activations(plan: SchedulePlan, rank: int, stage_bytes: Callable[[int], int]) -> int:
    """The peak, over rank ``rank``'s compute actions in order, of the activation bytes it holds."""
    held = peak = 0
    for action in plan.actions[rank]:
        parts = action.sub_actions if action.computation_type == OVERLAP_F_B else (action,)
        for part in parts:
            kind, size = part.computation_type, stage_bytes(part.stage_index)
            if kind == FORWARD:
                held += size
                peak = max(peak, held)
            elif kind in (FULL_BACKWARD, BACKWARD_WEIGHT):
                held -= size
            elif kind != BACKWARD_INPUT:
                raise ValueError(f"no activation rule for action {part}")
    return peak


__all__ = ["PieceActivations", "peak_activations"]
