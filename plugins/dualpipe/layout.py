"""Where pipeline stages live: stage -> rank, the forward paths (chains), stage -> model piece.

A *stage* here is a schedule's stage index (torch.distributed.pipelining's ``stage_index``); a *piece*
is a contiguous layer range of the model (``partition.py``). They differ only for ``dualpipe``, which
keeps two copies of every piece, one per direction:

    schedule     ranks  stages  chains (forward paths)          stage s on rank       piece of s
    1f1b, zb     N      N       (0 .. N-1)                      s                     s
    dualpipev    N      2N      (0 .. 2N-1), a V                s if s < N else 2N-1-s s
    dualpipe     N      2N      (0 .. N-1) and (N .. 2N-1)      s if s < N else 2N-1-s s mod N

So under DualPipeV rank 0 holds the first and the last piece (embedding and head with MTP); under
DualPipe rank r holds piece r for the forward direction and piece N-1-r for the reverse direction,
whose micro-batches enter at rank N-1. Parameters are 2x, as in SPEC.md §7.1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineLayout:
    num_ranks: int
    """Pipeline ranks (``pipeline_parallel_size``)."""
    stage_to_rank: dict[int, int]
    """Schedule stage index -> pipeline rank."""
    chains: tuple[tuple[int, ...], ...]
    """Each chain is the forward path of the micro-batches that enter it; ``dualpipe`` has two."""
    num_pieces: int
    """Layer ranges the model is cut into (``dualpipe`` runs each twice)."""

    @property
    def num_stages(self) -> int:
        return len(self.stage_to_rank)

    def piece(self, stage: int) -> int:
        return stage % self.num_pieces

    def stages_of(self, rank: int) -> list[int]:
        return sorted(s for s, r in self.stage_to_rank.items() if r == rank)

    def prev_stage(self, stage: int) -> int | None:
        chain = self._chain(stage)
        i = chain.index(stage)
        return chain[i - 1] if i > 0 else None

    def next_stage(self, stage: int) -> int | None:
        chain = self._chain(stage)
        i = chain.index(stage)
        return chain[i + 1] if i + 1 < len(chain) else None

    def is_first(self, stage: int) -> bool:
        return self.prev_stage(stage) is None

    def is_last(self, stage: int) -> bool:
        return self.next_stage(stage) is None

    def _chain(self, stage: int) -> tuple[int, ...]:
        for chain in self.chains:
            if stage in chain:
                return chain
        raise KeyError(f"stage {stage} is in no chain of {self.chains}")


def linear_layout(num_ranks: int) -> PipelineLayout:
    """One stage per rank (1F1B, ZB1P)."""
    return PipelineLayout(num_ranks, {s: s for s in range(num_ranks)}, (tuple(range(num_ranks)),), num_ranks)


def v_layout(num_ranks: int) -> PipelineLayout:
    """2N stages in a V: rank r holds stages r and 2N-1-r (DualPipeV, ZBV)."""
    n = num_ranks
    mapping = {s: s if s < n else 2 * n - 1 - s for s in range(2 * n)}
    return PipelineLayout(n, mapping, (tuple(range(2 * n)),), 2 * n)


def bidirectional_layout(num_ranks: int) -> PipelineLayout:
    """DualPipe: two N-stage pipelines in opposite directions over the same N ranks."""
    n = num_ranks
    mapping = {s: s if s < n else 2 * n - 1 - s for s in range(2 * n)}
    return PipelineLayout(n, mapping, (tuple(range(n)), tuple(range(n, 2 * n))), n)
