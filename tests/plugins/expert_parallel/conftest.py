"""One intra-op thread (forked ranks inherit it): on the shared 2-core machine OpenMP's spinning
threads of 2-4 processes would otherwise slow the tiny models here by orders of magnitude. (Process
groups are destroyed after every test by the suite-wide fixture in tests/conftest.py.)"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
