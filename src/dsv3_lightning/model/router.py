"""The DeepSeekMoE router (module name ``mlp.gate``), SPEC.md §4.1, and the statistics it records.

Legend: T tokens, D hidden, E routed experts, G groups, K experts per token.

    s      = sigmoid(x W^T)  (or softmax)       [T, E]  float32 whatever the model dtype
    s~     = s + e_score_correction_bias        selection scores; the bias never reaches the weights
    group  = sum of top-2 s~ per group (sigmoid, V3) | max s per group (softmax, V2)   [T, G]
    keep the top ``topk_group`` groups, mask the other experts' s~ to -inf (DeepSeek's reference; HF
    masks with 0, which only differs when s~ can be negative)
    ids    = top-K of the masked s~             [T, K]
    w      = s gathered at ids, normalised to sum 1 if ``norm_topk_prob``, × routed_scaling_factor
             (DeepSeek's V2 code honours norm_topk_prob for softmax too; the V2 checkpoints set it false)

The selection bias ``e_score_correction_bias`` is a float32 buffer: outside autograd and the optimizer,
saved in checkpoints, moved only by a balancing callback. No token is ever dropped.

Statistics seam: every forward leaves a ``RouterStats`` in ``router.last_stats`` (the unbiased scores
keep their graph) and adds its tokens-per-expert counts to ``router.tokens_routed_total`` (int64,
every forward, training or evaluation: a reader takes differences around what it measures, e.g. one
batch, however many forwards a strategy runs for it); in training it also adds them to
``router.tokens_per_expert_sum`` until a callback reads and resets them with ``pop_tokens_per_expert``
(summing over gradient-accumulation micro-batches is then automatic).

Loss seam: ``router.losses`` (router_losses.py, shared by the LightningModule's routers) computes the
registered balance terms from each training forward's statistics and attaches them to the gate
weights, so that every layer gets its term's gradient wherever it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_lightning.config import ModelConfig
from dsv3_lightning.model.router_losses import RouterLosses


def _recomputing() -> bool:
    """True while autograd's engine runs a forward again (activation checkpointing's recomputation).

    Routing is counted in the original forward only, so that checkpointed layers (reentrant or not)
    count each token once. torch exposes no public query for this; the engine's current graph-task
    id is -1 outside backward.
    """
    return torch._C._current_graph_task_id() != -1


@dataclass
class RouterStats:
    """What one forward of one router decided, for balance losses and load metrics."""

    scores_TE: torch.Tensor
    """Unbiased affinities s (float32, with grad)."""
    topk_ids_TK: torch.Tensor
    """Selected experts per token."""
    tokens_per_expert_E: torch.Tensor
    """Tokens routed to each expert (int64, no grad)."""
    batch_shape: tuple[int, ...]
    """(B, S) of the tokens, so that per-sequence losses can regroup T = B·S."""


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.num_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.scoring_func, self.norm_topk_prob = c.scoring_func, c.norm_topk_prob
        self.routed_scaling_factor = c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        self.register_buffer(
            "tokens_per_expert_sum", torch.zeros(c.n_routed_experts, dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "tokens_routed_total", torch.zeros(c.n_routed_experts, dtype=torch.int64), persistent=False
        )
        self.last_stats: RouterStats | None = None
        self.recording = True
        """False: forwards leave no counts and no loss terms (``statistics_paused``)."""
        self.losses: RouterLosses | None = None
        """The module's loss terms (set by ``DSV3LightningModule.register_loss_term``); None: none."""

    def _apply(self, fn, recurse=True):
        # Keep the bias and the counts in float32, unrounded, when the model is cast (model.bfloat16()):
        # only their device follows the cast.
        kept = {name: self._buffers[name] for name in ("e_score_correction_bias", "tokens_per_expert_sum")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def reset_buffers(self, device: torch.device) -> None:
        """Zeroes the step counts on ``device`` (the selection bias is state: loaded, never reset here)."""
        self.tokens_per_expert_sum = torch.zeros_like(self.tokens_per_expert_sum, device=device)
        self.tokens_routed_total = torch.zeros_like(self.tokens_routed_total, device=device)

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x_TD.float(), self.weight.float())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(-1)

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, K] from group-limited top-k on the biased scores (no grad)."""
        biased = scores_TE.detach() + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = biased.unflatten(-1, (self.n_group, -1))  # [T, G, E/G]
            if self.scoring_func == "sigmoid":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
        return biased.topk(self.top_k, dim=-1).indices

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (topk_ids [T, K], topk_weights [T, K] float32) for the flattened tokens."""
        scores = self.scores(x_BSD.flatten(0, -2))
        topk_ids = self.select(scores)
        weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        counts = torch.bincount(topk_ids.flatten(), minlength=self.num_experts)
        stats = RouterStats(scores, topk_ids, counts, tuple(x_BSD.shape[:-1]))
        if self.recording and not _recomputing():
            self.tokens_routed_total += counts
            if self.training:
                self.tokens_per_expert_sum += counts
                if self.losses and torch.is_grad_enabled():
                    weights = self.losses.attach(self, stats, weights)
        self.last_stats = stats
        return topk_ids, weights

    @torch.no_grad()
    def pop_tokens_per_expert(self) -> torch.Tensor:
        """The counts accumulated since the last call (float32 [E]), resetting them to zero."""
        counts = self.tokens_per_expert_sum.clone()
        self.tokens_per_expert_sum.zero_()
        return counts


@contextmanager
def statistics_paused(module: nn.Module) -> Iterator[None]:
    """Forwards of ``module``'s routers within leave no statistics (counts, loss terms): for forwards
    that are not part of training or evaluation, such as a pipeline stage's shape inference."""
    routers = [m for m in module.modules() if isinstance(m, Router)]
    for router in routers:
        router.recording = False
    try:
        yield
    finally:
        for router in routers:
            router.recording = True
