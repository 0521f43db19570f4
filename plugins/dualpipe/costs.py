"""Measured chunk costs F, B, W of a pipeline piece, for the simulator.

``measure_chunk_costs(module, tokens, layers=(1, 2))`` times, in this process, one piece of the model
(decoder layers ``[1, 2)``: a middle piece, no embedding or head) on one micro-batch:

    F   the piece's forward
    B   its full backward (input and weight gradients, one autograd pass)
    W   the weight part of torch's split backward (``stage_backward_weight`` after
        ``stage_backward_input``), as the zero-bubble schedules run it

each the median of ``repeats`` runs after one warm-up. The split I + W usually costs more than B (the
split walks part of the graph twice); the simulator takes B and W and charges I = B - W.
"""

from __future__ import annotations

import statistics
import time

import torch
from dsv3_lightning.plugins.dualpipe.partition import PipelinePiece
from dsv3_lightning.plugins.dualpipe.simulator import ChunkCosts
from dsv3_lightning.plugins.dualpipe.torch_pipelining import stage_backward_input, stage_backward_weight

from dsv3_lightning.module import DSV3LightningModule


def measure_chunk_costs(
    module: DSV3LightningModule, tokens: torch.Tensor, *, layers: tuple[int, int] = (1, 2), repeats: int = 5
) -> tuple[ChunkCosts, dict[str, float]]:
    """(costs in seconds, all timings incl. the split's I) of decoder layers ``layers`` on ``tokens``."""
    n = module.config.num_hidden_layers
    piece = PipelinePiece(module, 1, layers, num_pieces=3 if 0 < layers[0] and layers[1] < n else n)
    inputs, _ = module._split(tokens)
    with torch.no_grad():
        h0 = module.model.embed(inputs)
    params = list(piece.parameters())
    times: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": []}

    def clock(key: str, fn) -> object:
        start = time.perf_counter()
        out = fn()
        times[key].append(time.perf_counter() - start)
        return out

    for _ in range(repeats + 1):
        x = h0.clone().requires_grad_()
        y = clock("F", lambda x=x: piece(x, tokens))
        dy = torch.randn_like(y)
        clock("B", lambda y=y, dy=dy: torch.autograd.backward(y, dy))
        x = h0.clone().requires_grad_()
        y = piece(x, tokens)
        _, groups = clock("I", lambda y=y, x=x, dy=dy: stage_backward_input([y], [dy], [x], iter(params)))
        clock("W", lambda groups=groups: stage_backward_weight(iter(params), groups))
        module.zero_grad(set_to_none=True)
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    w = min(median["W"], median["B"])
    return ChunkCosts(F=median["F"], B=median["B"], W=w), median
