"""One intra-op thread for the tiny models here: on a loaded 2-core machine OpenMP's spinning threads
make a 0.1 s reference step take 25 s. Restored after each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
