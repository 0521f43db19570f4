"""The model cut into pipeline pieces by layer ranges, each piece an ``nn.Module`` a stage can run.

Piece p of P holds decoder layers ``[start_p, end_p)`` (even split, the remainder to the middle
pieces, since the first piece also embeds and the last also runs the head). The first piece embeds
the window's input tokens; the last applies the final norm and ``lm_head`` and the LightningModule's
prediction heads (MTP) and returns the micro-batch's training loss, a scalar:

    piece 0        tokens [b, S+1+extra] -> embed_tokens -> layers[0:e0]            -> h [b, S, D]
    piece p        h                     -> layers[s_p:e_p]                         -> h
    piece P-1      h                     -> layers[..:L] -> norm, lm_head -> module.batch_loss -> loss []

Every piece gets its micro-batch as the keyword ``tokens``: plain windows [b, S+1+extra], or a
``Batch`` (dsv3_lightning/batch.py) of a conversation batch, with its loss mask, its packed
documents and the step's global target counts (``Batch.split``). So the last piece has its targets
and MTP its shifted inputs, and every piece the documents, which keep attention inside each
conversation and restart its positions in every layer (``run_layers(..., documents=...)``). A piece
borrows the core's stage seam (``DeepSeekV3.embed``, ``run_layers``, ``head``) and registers as its
own submodules only what it runs, so that ``piece.parameters()`` is the piece's weights (what a
PipelineStage splits into input and weight gradients). MTP embeds with ``embed_tokens``: the last
piece then uses the embedding too, and a layout whose first and last pieces sit on different ranks
sums the embedding's gradient over both (``shared_parameters``), as Megatron's embedding group does;
under DualPipeV (and DualPipe) they share a rank, as DeepSeek exploits.

The loss is the LightningModule's own step API (``batch_loss``: main CE + the heads' losses), so a
change to the module's loss applies here too. Loss terms registered by callbacks (sequence-wise
balance losses) are not added here: each router attaches its term to its own layer's output, on
whichever piece runs it (model/router_losses.py), and the runner collects their values after the
schedule.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3_lightning.batch import Batch
from dsv3_lightning.module import DSV3LightningModule

_KEY = "trainer.strategy.init_args"


def split_layers(
    num_layers: int, num_pieces: int, *, schedule: str = "", ranks: int = 0
) -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` layer ranges, one per piece; the extra layers go to the middle pieces."""
    if num_pieces > num_layers:
        per_rank = f" ({num_pieces // ranks} per rank under schedule {schedule!r})" if ranks else ""
        raise ValueError(
            f"model.config.num_hidden_layers ({num_layers}) is smaller than the number of pipeline stages "
            f"({num_pieces}{per_rank}): every stage needs at least one layer; lower "
            f"{_KEY}.pipeline_parallel_size or raise model.config.num_hidden_layers"
        )
    base, extra = divmod(num_layers, num_pieces)
    sizes = [base] * num_pieces
    order = sorted(range(num_pieces), key=lambda p: (p in (0, num_pieces - 1), abs(p - (num_pieces - 1) / 2)))
    for p in order[:extra]:
        sizes[p] += 1
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


class PipelinePiece(nn.Module):
    """Piece ``index`` of ``num_pieces`` of a DSV3LightningModule (see the module docstring)."""

    def __init__(
        self, module: DSV3LightningModule, index: int, layers: tuple[int, int], num_pieces: int
    ) -> None:
        super().__init__()
        self.index, self.layer_range, self.num_pieces = index, layers, num_pieces
        self.is_first, self.is_last = index == 0, index == num_pieces - 1
        model = module.model
        object.__setattr__(self, "_module", module)  # borrowed, not a submodule
        self.layers = nn.ModuleList(model.model.layers[layers[0] : layers[1]])
        self.embed_tokens = (
            model.model.embed_tokens if self.is_first or (self.is_last and module.heads) else None
        )
        self.norm = model.model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.heads = module.heads if self.is_last else None
        self.logs: list[dict[str, torch.Tensor]] = []
        """Per micro-batch in forward order (last piece only): the detached ``loss``, ``ce`` and heads' logs."""

    def forward(self, x: torch.Tensor | None, tokens: torch.Tensor | Batch) -> torch.Tensor:
        """``x``: the previous piece's h (unused by the first piece); ``tokens``: the micro-batch."""
        module = self._module
        if not isinstance(tokens, Batch):  # plain windows (a conversation batch comes read and split)
            assert isinstance(tokens, torch.Tensor), type(tokens)
            tokens = module.read_batch(tokens)
        batch, model = tokens, module.model
        h = model.embed(batch.inputs) if self.is_first else x
        h = model.run_layers(h, *self.layer_range, documents=batch.input_documents)
        if not self.is_last:
            return h
        return self.loss(h, batch)

    def loss(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The module's own step API (``DSV3LightningModule.batch_loss``), without loss terms."""
        module = self._module
        loss, logs = module.batch_loss(module.model.head(h), h, batch, loss_terms=False)
        self.logs.append({"loss": loss.detach(), **logs})
        return loss


def build_pieces(
    module: DSV3LightningModule, num_pieces: int, *, schedule: str = "", ranks: int = 0
) -> list[PipelinePiece]:
    bounds = split_layers(module.config.num_hidden_layers, num_pieces, schedule=schedule, ranks=ranks)
    return [PipelinePiece(module, p, bounds[p], num_pieces) for p in range(num_pieces)]


def parameter_names(piece: PipelinePiece, module: DSV3LightningModule) -> set[str]:
    """Names (as in ``module.named_parameters()``) of the parameters the piece uses."""
    ids = {id(p) for p in piece.parameters()}
    return {name for name, p in module.named_parameters() if id(p) in ids}
