"""One intra-op thread for the tiny models here: on a loaded 2-core machine OpenMP's spinning threads
make a 0.1 s reference step take 25 s. Restored after each test."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here with one intra-op thread (tests/conftest.py's ``one_thread``)."""
