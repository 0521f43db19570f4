"""One intra-op thread (forked ranks inherit it): on the shared 2-core machine OpenMP's spinning
threads of 2-4 processes would otherwise slow the tiny models here by orders of magnitude. (Process
groups are destroyed after every test by the suite-wide fixture in tests/conftest.py.)"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here with one intra-op thread (tests/conftest.py's ``one_thread``)."""
