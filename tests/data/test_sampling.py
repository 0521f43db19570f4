"""The global training order: computed permutations, dealing to replicas, resuming on another mesh,
mixtures, and memory that does not grow with the corpus."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dsv3_lightning.data.sampling import (
    MIX_BLOCK,
    CorpusOrder,
    FeistelPermutation,
    GlobalOrderSampler,
    MixtureOrder,
    apportion,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097, 65_537])
def test_feistel_is_a_permutation(n: int) -> None:
    values = FeistelPermutation(n, 5, 0)(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))


def test_feistel_shuffles_and_depends_on_its_key() -> None:
    n = 100_000
    a, b = FeistelPermutation(n, 1, 0)(np.arange(n)), FeistelPermutation(n, 1, 1)(np.arange(n))
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.02  # no trace of the identity
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02  # another epoch, another order
    assert np.array_equal(a, FeistelPermutation(n, 1, 0)(np.arange(n)))  # a function of the key only
    # Neighbouring positions land far apart: the mean gap is about n / 3 for a random order.
    assert 0.25 * n < np.abs(np.diff(a)).mean() < 0.42 * n


def _consumed(samplers: list[GlobalOrderSampler], epoch: int) -> list[int]:
    """Stream positions of one epoch, batch by batch in global order (every replica's lanes)."""
    per_rank = [list(s.positions(epoch)) for s in samplers]
    out: list[int] = []
    for step in zip(*per_rank, strict=True):
        out.extend(np.sort(np.concatenate(step)).tolist())
    return out


def _samplers(order, n, replicas, batch, resume=None):
    return [
        GlobalOrderSampler(order, num_windows=n, num_replicas=replicas, rank=r, batch_size=batch, resume=resume)
        for r in range(replicas)
    ]


def test_replicas_split_each_global_batch_of_one_process() -> None:
    """R replicas of batch B read, step by step, the windows one process reads with batch R x B."""
    n, order = 1000, CorpusOrder(1000, seed=3)
    one = GlobalOrderSampler(order, num_windows=n, num_replicas=1, rank=0, batch_size=12)
    four = _samplers(order, n, replicas=4, batch=3)
    assert len(one) // 12 == len(four[0]) // 3 == 1000 // 12
    single = list(iter(one))
    dealt = [list(iter(s)) for s in four]
    for step in range(len(single) // 12):
        together = sorted(i for rank in dealt for i in rank[3 * step : 3 * step + 3])
        assert together == sorted(single[12 * step : 12 * step + 12])
    assert sorted(single) == sorted(set(single))  # no window twice in an epoch


@pytest.mark.parametrize(("before", "after"), [((2, 4), (3, 2)), ((1, 8), (4, 4)), ((4, 2), (1, 3))])
def test_resume_with_another_mesh_continues_with_the_next_unseen_window(before, after) -> None:
    """Stop mid-epoch with (replicas, batch) = before, resume with after: the positions consumed over
    three epochs are 0, 1, 2, ... without a gap or a repeat, across epoch boundaries."""
    n, order = 97, CorpusOrder(97, seed=0)
    first = _samplers(order, n, *before)
    per_epoch = first[0].batches_per_epoch
    stop = per_epoch // 2 + 1
    seen = _consumed(first, 0)[: stop * first[0].global_batch]
    samples_done = first[0].samples_done(0, stop)
    assert samples_done == len(seen)
    resumed = _samplers(order, n, *after, resume=(0, samples_done, stop))
    for epoch in range(3):
        seen += _consumed(resumed, epoch)
    assert seen == list(range(len(seen)))
    assert resumed[0].samples_done(2, resumed[0].batches_per_epoch) == len(seen)


def test_the_stream_visits_every_window_once_per_data_epoch() -> None:
    n = 50
    order = CorpusOrder(n, seed=9)
    windows = order(np.arange(3 * n))
    for epoch in range(3):
        assert sorted(windows[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(windows[:n], windows[n : 2 * n])


def test_sampler_memory_does_not_grow_with_the_corpus() -> None:
    peaks = {}
    for n in (10**6, 10**9):
        tracemalloc.start()
        sampler = GlobalOrderSampler(CorpusOrder(n, seed=1), num_windows=n, num_replicas=8, rank=3, batch_size=16)
        sampler.set_epoch(2)
        it = iter(sampler)
        batch = [next(it) for _ in range(16 * 20)]
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert all(0 <= i < n for i in batch) and len(set(batch)) == len(batch)
    assert peaks[10**9] < 64 * 1024 and peaks[10**9] < 2 * peaks[10**6] + 8 * 1024, peaks


def test_apportion_is_exact_and_keeps_small_weights() -> None:
    assert apportion([0.3, 0.7], 4096).tolist() == [1229, 2867]
    shares = apportion([1e-6, 1.0, 2.0], 4096)
    assert shares.sum() == 4096 and shares[0] == 1
    assert apportion([0.0, 1.0], 10).tolist() == [0, 10]


def test_mixture_keeps_its_weights_and_each_corpus_its_own_epochs() -> None:
    sizes = [300, 1000]  # the small corpus repeats more often: its epochs are shorter
    order = MixtureOrder(sizes, [0.3, 0.7], seed=4)
    windows = order(np.arange(4 * MIX_BLOCK))
    from_first = windows < sizes[0]
    for block in range(4):
        assert from_first[block * MIX_BLOCK : (block + 1) * MIX_BLOCK].sum() == 1229  # exact in every block
    # Each corpus reads its own stream positions 0, 1, 2, ... exactly once (in a shuffled order within
    # a block): corpus 0 got 4 x 1229 = 16 epochs of 300 and 116 windows more, corpus 1 11 x 1000 + 468.
    counts_first = np.bincount(windows[from_first], minlength=300)
    counts_second = np.bincount(windows[~from_first] - sizes[0], minlength=1000)
    assert set(counts_first.tolist()) == {16, 17} and (counts_first == 17).sum() == 4 * 1229 - 16 * 300
    assert set(counts_second.tolist()) == {11, 12} and (counts_second == 12).sum() == 4 * 2867 - 11 * 1000
    assert np.array_equal(windows, MixtureOrder(sizes, [0.3, 0.7], seed=4)(np.arange(4 * MIX_BLOCK)))
    assert not np.array_equal(windows, MixtureOrder(sizes, [0.3, 0.7], seed=5)(np.arange(4 * MIX_BLOCK)))
    # Interleaved, not in runs: the first corpus's share of every 64 positions stays near 0.3.
    runs = from_first[: 64 * 64].reshape(64, 64).mean(axis=1)
    assert 0.1 < runs.min() and runs.max() < 0.5


def test_evaluation_sampler_is_lightnings_padded_round_robin_without_the_list() -> None:
    from torch.utils.data import DistributedSampler

    from dsv3_lightning.data.sampling import EvaluationSampler

    for n, replicas in [(10, 3), (7, 7), (5, 8), (100, 4)]:
        for rank in range(replicas):
            ours = list(EvaluationSampler(n, num_replicas=replicas, rank=rank))
            torch_s = DistributedSampler(range(n), num_replicas=replicas, rank=rank, shuffle=False)
            assert ours == list(torch_s) and len(ours) == len(torch_s)
