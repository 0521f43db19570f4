"""ResumableShuffleSampler: the training order, and where a resumed run picks it up again.

The order of epoch e is DistributedSampler's: a permutation seeded by ``seed + e`` (Lightning calls
``set_epoch``), dealt to the ranks round-robin, the tail that does not divide evenly dropped. It is a
function of (seed, epoch) only, so a run resumed from a checkpoint sees the same order as one that
never stopped. The data module records in its checkpoint state how many batches of the current
epoch were consumed; ``resume_at`` makes the next iteration of that epoch skip them, so a run resumed
mid-epoch continues with the very next batch instead of replaying the epoch from its start.

Being a DistributedSampler, Lightning leaves it in place under any distributed strategy instead of
wrapping it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler


class ResumableShuffleSampler(DistributedSampler):
    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """The next iteration over ``epoch`` starts after its first ``batches_done`` batches (once)."""
        self._resume = (epoch, batches_done)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] * self.batch_size :]
            self._resume = None
        return iter(indices)
