"""The training order: one global stream of windows, a function of the seed alone, dealt to replicas.

**The stream.** Training reads an endless stream of window positions ``p = 0, 1, 2, ...``. With one
corpus of ``N`` windows, position ``p`` is window ``perm_e(p mod N)`` of data epoch ``e = p // N``,
where ``perm_e`` is a pseudo-random permutation of ``[0, N)`` keyed by ``(seed, e)``. With a mixture
(:class:`MixtureOrder`) each block of ``MIX_BLOCK`` positions holds each corpus's share of the block
(largest-remainder apportionment of the weights), shuffled within the block, and each corpus runs
through its own epochs at its own pace. Nothing here depends on the number of processes.

**Computed, not listed.** ``perm_e`` is a Feistel network over the next power of four above ``N``
(six rounds of a splitmix64 round function) with cycle-walking back into ``[0, N)``: a bijection whose
value at any position costs a few integer operations, so the sampler holds a few keys, never a list of
``N`` indices (:class:`FeistelPermutation`; ``benchmarks/data_at_scale.py`` measures its memory at
``10^6`` and ``10^9`` windows). A torch ``DistributedSampler`` materialises ``randperm(N)`` and a Python
list of it on every rank each epoch: 48 bytes a window measured, over 170 GB at V3's 3.6 B windows.

**Dealing.** A training step consumes the next ``G = batch_size x replicas`` positions of the stream;
replica ``r`` takes positions ``base + j * replicas + r`` (``j < batch_size``), so the windows of one
global batch are the same whatever the number of replicas, and after ``k`` steps exactly the first
``k * G`` positions are consumed. The checkpoint records that count (``samples_done``); a run resumed
with another number of replicas or another batch size continues at the next unseen position: no
window is skipped or repeated, and a Lightning epoch is only a count of ``len(dataloader)`` batches
(``N // G``) laid on the stream.

**Lightning's counter.** Lightning restores the interrupted epoch's batch counter ``k0`` itself and
ends an epoch after ``len(dataloader)`` batches, so the resumed epoch yields ``len - k0`` batches from
the saved position, and later epochs follow on from there. Lightning calls ``set_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import DistributedSampler

# Positions per mixture block: each corpus's share of a block is exact to 1 / MIX_BLOCK.
MIX_BLOCK = 4096
_ROUNDS = 6


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): the Feistel round function."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _keys(*words: int) -> np.ndarray:
    return np.random.SeedSequence([int(w) for w in words]).generate_state(_ROUNDS, dtype=np.uint64)


class FeistelPermutation:
    """A keyed bijection of ``[0, n)``, evaluated at any index in O(1) time and memory."""

    def __init__(self, n: int, *key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs at least one element, got n={n}")
        self.n = n
        self._half = max(1, math.ceil((n - 1).bit_length() / 2))
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys = _keys(*key)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_splitmix64(right ^ key) & self._mask)
        return (left << half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = self._encrypt(np.asarray(index, dtype=np.uint64))
            outside = x >= np.uint64(self.n)
            while outside.any():  # cycle-walking: the domain is at most 4n, so ~4 passes at worst
                x[outside] = self._encrypt(x[outside])
                outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


class KeyedPermutations:
    """``FeistelPermutation(n, *prefix, key)`` by key, keeping the few in flight (one or two epochs or
    blocks at a time) instead of rebuilding one for every batch."""

    def __init__(self, n: int, *prefix: int) -> None:
        self.n = n
        self.prefix = prefix
        self._made: dict[int, FeistelPermutation] = {}

    def __call__(self, key: int) -> FeistelPermutation:
        if key not in self._made:
            if len(self._made) > 4:
                self._made.clear()
            self._made[key] = FeistelPermutation(self.n, *self.prefix, key)
        return self._made[key]


def by_group(keys: np.ndarray, values: np.ndarray, fn) -> np.ndarray:
    """``fn(key, values[keys == key])`` for each distinct key, each result put back in its places."""
    out = np.empty_like(values)
    for key in np.unique(keys).tolist():
        where = keys == key
        out[where] = fn(key, values[where])
    return out


class CorpusOrder:
    """Stream position -> window of one corpus: data epoch ``p // n``, permuted by ``(seed, corpus, epoch)``."""

    def __init__(self, num_windows: int, seed: int, corpus: int = 0) -> None:
        self.num_windows = num_windows
        self.seed = seed
        self.corpus = corpus
        self._perms = KeyedPermutations(num_windows, seed, corpus)  # by data epoch

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.num_windows)
        return by_group(epochs, offsets, lambda epoch, x: self._perms(epoch)(x))


def apportion(weights: Sequence[float], total: int) -> np.ndarray:
    """Largest-remainder shares of ``total`` by ``weights`` (each positive weight gets at least 1)."""
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    shares = np.floor(w * total).astype(np.int64)
    shares[(shares == 0) & (w > 0)] = 1
    remainders = w * total - shares
    for i in np.argsort(-remainders, kind="stable")[: total - int(shares.sum())]:
        shares[i] += 1
    while shares.sum() > total:  # only when many tiny weights were raised to 1
        shares[np.argmax(shares)] -= 1
    return shares


class MixtureOrder:
    """Stream position -> global window index over several corpora mixed by weight.

    ``offsets[c]`` is corpus ``c``'s first index in the concatenated dataset. Block ``b`` covers
    positions ``[b M, (b + 1) M)``; a keyed permutation of the block's slots assigns ``shares[c]`` of
    them to corpus ``c``, which reads its own positions ``b * shares[c] + (slot - start[c])``.
    """

    def __init__(self, num_windows: Sequence[int], weights: Sequence[float], seed: int) -> None:
        self.shares = apportion(weights, MIX_BLOCK)
        self.starts = np.concatenate([[0], np.cumsum(self.shares)[:-1]])
        self.offsets = np.concatenate([[0], np.cumsum(num_windows)[:-1]]).astype(np.int64)
        self.corpora = [CorpusOrder(n, seed, corpus=c + 1) for c, n in enumerate(num_windows)]
        self.seed = seed
        self._blocks = KeyedPermutations(MIX_BLOCK, seed, 0)  # by block

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        blocks, offsets = np.divmod(np.asarray(positions, dtype=np.int64), MIX_BLOCK)
        slots = by_group(blocks, offsets, lambda block, x: self._blocks(block)(x))
        corpus = np.searchsorted(self.starts, slots, side="right") - 1
        local = blocks * self.shares[corpus] + slots - self.starts[corpus]
        return by_group(corpus, local, lambda c, q: self.offsets[c] + self.corpora[c](q))


class GlobalOrderSampler(DistributedSampler):
    """This replica's windows of the global stream, one Lightning epoch at a time (module docstring).

    A ``DistributedSampler`` by type only (its constructor is not called: it would size a list of the
    dataset), so that Lightning leaves it in place under every distributed strategy instead of wrapping
    it in another one.

    Args:
        order: Maps stream positions to dataset indices (:class:`CorpusOrder`, :class:`MixtureOrder`).
        num_windows: Windows in the dataset; a Lightning epoch is ``num_windows // (batch_size *
            num_replicas)`` batches.
        resume: ``(epoch, samples_done, batches_done)`` of a checkpoint: the epoch Lightning resumes,
            the stream position to continue at, and the batches of that epoch Lightning counts as done.
    """

    def __init__(
        self,
        order: CorpusOrder | MixtureOrder,
        *,
        num_windows: int,
        num_replicas: int,
        rank: int,
        batch_size: int,
        resume: tuple[int, int, int] | None = None,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} replicas")
        self.order = order
        self.num_replicas = num_replicas
        self.rank = rank
        self.batch_size = batch_size
        self.global_batch = batch_size * num_replicas
        self.batches_per_epoch = num_windows // self.global_batch
        self.resume = resume
        self.epoch = 0
        self.seed = getattr(order, "seed", 0)
        self.shuffle, self.drop_last = True, True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def _skipped(self, epoch: int) -> int:
        """Batches of ``epoch`` that Lightning counts as done before this sampler yields any."""
        if self.resume is not None and epoch == self.resume[0]:
            return min(self.resume[2], self.batches_per_epoch)
        return 0

    def epoch_start(self, epoch: int) -> int:
        """Stream position of the first batch this sampler yields in ``epoch``."""
        per_epoch = self.batches_per_epoch * self.global_batch
        if self.resume is None or epoch < self.resume[0]:
            return epoch * per_epoch
        resumed_epoch, samples_done, batches_done = self.resume
        if epoch == resumed_epoch:
            return samples_done
        rest = max(self.batches_per_epoch - batches_done, 0) * self.global_batch
        return samples_done + rest + (epoch - resumed_epoch - 1) * per_epoch

    def samples_done(self, epoch: int, batches_done: int) -> int:
        """Stream positions consumed once Lightning has counted ``batches_done`` batches of ``epoch``."""
        return self.epoch_start(epoch) + (batches_done - self._skipped(epoch)) * self.global_batch

    def batch_positions(self, epoch: int, first: int, count: int) -> np.ndarray:
        """Every replica's stream positions of Lightning's batches ``first .. first + count - 1`` of
        ``epoch`` (batch indices as Lightning counts them, a resumed epoch's done ones included)."""
        start = self.samples_done(epoch, first)
        return np.arange(start, start + count * self.global_batch, dtype=np.int64)

    def positions(self, epoch: int) -> Iterator[np.ndarray]:
        """This replica's stream positions, batch by batch."""
        start = self.epoch_start(epoch)
        lanes = np.arange(self.batch_size, dtype=np.int64) * self.num_replicas + self.rank
        for step in range(self.batches_per_epoch - self._skipped(epoch)):
            yield start + step * self.global_batch + lanes

    def __iter__(self) -> Iterator[int]:
        for positions in self.positions(self.epoch):
            yield from self.order(positions).tolist()


class EvaluationSampler(DistributedSampler):
    """Validation windows in order, dealt round-robin to the replicas, computed rather than listed.

    What Lightning's ``DistributedSampler(shuffle=False)`` yields (replica ``r`` reads windows ``r, r + R,
    ...``; the last round is padded with the first windows so that every replica runs as many batches,
    which its collectives need), without the list of every window index it builds on each rank.
    """

    def __init__(self, num_windows: int, *, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} replicas")
        self.num_windows = num_windows
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_samples = -(-num_windows // num_replicas)
        self.epoch, self.seed, self.shuffle, self.drop_last = 0, 0, False, False

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        for i in range(self.num_samples):
            yield (self.rank + i * self.num_replicas) % self.num_windows
