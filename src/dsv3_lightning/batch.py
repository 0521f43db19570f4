"""What a training step reads from a batch: windows of tokens, and for conversations which tokens are
targets and which conversation each token belongs to.

Pre-training batches are int64 tensors [B, L] of packed windows (every next token is a target).
Fine-tuning batches (``data.conversations``) are dicts of three [B, L] tensors: ``tokens``,
``loss_mask`` (token t is a target: an assistant token) and ``documents`` (the packed conversation of
each token, -1 for padding). ``Batch`` reads both the same way, for the main head and every
prediction head:

    inputs       tokens[:, :S]                          documents[:, :S]: attention and positions
    targets k    tokens[:, k : k + S]                   k = 1 for the next token, 1 + d for MTP depth d
    mask k       loss_mask[:, k : k + S] & (documents[:, k : k + S] == documents[:, :S])

A target counts only when it is a target token of the same conversation as the position predicting
it, so nothing is learnt across a packing boundary, at any depth.

Exactness on many processes. A masked loss is a mean over the targets of the *global* batch: each
process's share is ``its sum × replicas / global count``, so that the strategy's gradient average
over replicas (DDP, FSDP, expert parallelism) and the logged average of the processes' values are
both the global batch's mean, whatever the processes' own counts. The global counts of every offset
come from one all-reduce when the batch is read (``Batch.read``); without a mask nothing is reduced
and the plain mean cross-entropy runs as before.

Gradient accumulation (Lightning divides each of the A accumulated batches' losses by A): the
counts are those of the whole optimizer step, all replicas and all A batches, which the data order
knows in advance (``DSV3DataModule.step_counts``: no collective), and the shares count
``replicas × A``: each batch's loss is its masked sum × replicas × A / the step's count, and the
step's gradient is the mean over all its targets. A batch of another data source, read without
them, is normalised by its own global count (the accumulated batches' means are averaged).

Micro-batches of one step (a pipeline schedule, which weighs each of its M micro-batches' losses 1/M):
``split(M)`` cuts a batch read as above into M micro-batches of equal rows that keep the *whole*
batch's global counts and count ``replicas × M`` shares, so micro-batch m's loss is its masked sum
× replicas × M / global count, and the 1/M-weighted sum over the micro-batches is the whole batch's
share: the step's gradient and logged values are one process's on the global batch, however the
targets fall into the micro-batches. The counts are then summed over one process per replica (a
pipeline's ranks hold the same batch), once per step, before the split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

KEYS = ("tokens", "loss_mask", "documents")


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor
    """[B, L] int64 token ids: S inputs, the next-token target beyond them, the heads' extra tokens."""
    seq_len: int
    """S: the positions the model runs (``L - 1 - extra_tokens``)."""
    loss_mask: torch.Tensor | None = None
    """[B, L] bool: token t is a target; None: every token is."""
    documents: torch.Tensor | None = None
    """[B, L] int: the packed document of each token; None: one causal stream (pre-training)."""
    counts: torch.Tensor | None = None
    """[1 + offsets] float64 (with a mask): the global batch's positions, then its target counts at
    offsets 1, 2, ..."""
    replicas: int = 1
    """Processes whose shares of the batch the strategy averages."""

    @classmethod
    def read(
        cls,
        batch: torch.Tensor | Mapping[str, torch.Tensor],
        seq_len: int,
        *,
        offsets: int = 1,
        sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
        replicas: int = 1,
        counts: torch.Tensor | None = None,
    ) -> Batch:
        """A batch as the data module made it; with a ``loss_mask``, the global counts (positions, then
        targets at offsets 1..``offsets``) are ``counts`` when the caller knows them (the data order
        does: ``DSV3DataModule.step_counts``), else this batch's, summed over the processes
        (``sum_over_processes``: one all-reduce)."""
        if isinstance(batch, torch.Tensor):
            return cls(batch, seq_len)
        unknown = set(batch) - set(KEYS)
        if "tokens" not in batch or unknown:
            raise ValueError(f"a batch dict holds {sorted(KEYS)}; got {sorted(batch)}")
        plain = cls(batch["tokens"], seq_len, batch.get("loss_mask"), batch.get("documents"), replicas=replicas)
        if plain.loss_mask is None:
            return plain
        if counts is not None:
            return replace(plain, counts=counts[: 1 + offsets].to(plain.tokens.device, torch.float64))
        positions = plain.inputs.new_tensor(plain.inputs.numel())
        counts = torch.stack([positions, *(plain.target_mask(k).sum() for k in range(1, offsets + 1))])
        counts = counts.to(torch.float64)
        if sum_over_processes is not None:
            counts = sum_over_processes(counts)
        return cls(plain.tokens, seq_len, plain.loss_mask, plain.documents, counts, replicas)

    def split(self, num: int) -> list[Batch]:
        """``num`` micro-batches of equal rows that a step weighs 1/``num`` each: every one keeps the
        global counts and counts ``replicas × num`` shares (see above). The caller checks that ``num``
        divides B (the pipeline names its key)."""
        assert num >= 1 and self.tokens.shape[0] % num == 0, (self.tokens.shape, num)

        def rows_of(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
            return None if t is None else t.chunk(num)[i]

        return [
            replace(self, tokens=rows_of(self.tokens, i), loss_mask=rows_of(self.loss_mask, i),
                    documents=rows_of(self.documents, i), replicas=self.replicas * num)
            for i in range(num)
        ]  # fmt: skip

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, : self.seq_len]

    @property
    def input_documents(self) -> torch.Tensor | None:
        return None if self.documents is None else self.documents[:, : self.seq_len]

    def targets(self, offset: int = 1) -> torch.Tensor:
        """[B, S]: the token each position predicts at ``offset`` (1: the next token)."""
        return self.tokens[:, offset : offset + self.seq_len]

    def target_mask(self, offset: int = 1) -> torch.Tensor | None:
        """[B, S] bool: which of ``targets(offset)`` count (None: all)."""
        if self.loss_mask is None:
            return None
        mask = self.loss_mask[:, offset : offset + self.seq_len]
        if self.documents is not None:
            mask = mask & (self.documents[:, offset : offset + self.seq_len] == self.input_documents)
        return mask

    def cross_entropy(self, logits_BSV: torch.Tensor, offset: int = 1) -> torch.Tensor:
        """This process's share of the global batch's mean cross-entropy at ``offset`` (see above)."""
        flat = logits_BSV.flatten(0, 1).float(), self.targets(offset).flatten()
        if self.loss_mask is None:
            return F.cross_entropy(*flat)
        return self.mean(F.cross_entropy(*flat, reduction="none").view(logits_BSV.shape[:2]), offset)

    def mean(self, values_BS: torch.Tensor, offset: int = 1) -> torch.Tensor:
        """This process's share of the global batch's mean of per-target ``values`` [B, S] at ``offset``."""
        mask = self.target_mask(offset)
        if mask is None:
            return values_BS.mean()
        total = (values_BS * mask).sum()
        return total * self.replicas / self.global_count(offset).clamp_min(1).to(total.dtype)

    def global_count(self, offset: int = 1) -> torch.Tensor:
        """The global batch's number of targets at ``offset`` (0: its positions); needs a mask."""
        if self.counts is None or offset >= len(self.counts):
            raise ValueError(f"no global target count for offset {offset}: read the batch with offsets >= {offset}")
        return self.counts[offset]

    def target_weights(self, offset: int = 1) -> torch.Tensor | float:
        """[B·S] weights of the targets for a weighted mean metric (1.0: all count)."""
        mask = self.target_mask(offset)
        return 1.0 if mask is None else mask.flatten().float()


__all__ = ["KEYS", "Batch"]
