"""PipelineRunner's input checks, each with the YAML key and the fix."""

from __future__ import annotations

import pytest
from dsv3_lightning.plugins.dualpipe.runner import check_backend, split_microbatches
from dualpipe_tiny import make_tokens


def test_a_batch_the_microbatches_do_not_divide_is_refused_with_the_fix():
    assert [mb.shape[0] for mb in split_microbatches(make_tokens(8), 4)] == [2, 2, 2, 2]
    with pytest.raises(
        ValueError,
        match=r"batch has 6 windows, not a multiple of .*num_microbatches \(4\); "
        r"set data.batch_size to a multiple of 4",
    ):
        split_microbatches(make_tokens(6), 4)


def test_the_two_copy_runtime_refuses_backends_that_ignore_tags():
    check_backend("dualpipe", "gloo")
    check_backend("dualpipev", "nccl")  # torch's runtime
    with pytest.raises(
        NotImplementedError,
        match=r"schedule 'dualpipe' runs on our runtime.*nccl matches them in "
        r"order; use schedule 'dualpipev'",
    ):
        check_backend("dualpipe", "nccl")
