"""One intra-op thread (forked ranks inherit it: 2-4 processes on the shared 2-core machine), and the
gloo launcher of the expert-parallel tests, importable here as ``ep_launch``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "expert_parallel"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here with one intra-op thread (tests/conftest.py's ``one_thread``)."""
