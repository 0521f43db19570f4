"""Suite-wide set-up that must happen before any test module imports torch or triton, and the
fixtures several test folders share (a small real corpus, a clean sys.argv for the CLI)."""

import os
import shutil

# Triton's CPU interpreter must be chosen before triton is first imported (torch and Lightning
# import it early): without a GPU, the FP8 Triton kernels are tested through it.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import sysconfig  # noqa: E402  (after the environment set-up above)
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """Every test starts as a fresh process would: no process group left by a failed distributed test,
    float32 as the default dtype, the same intra-op thread count."""
    import torch
    import torch.distributed as dist

    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One intra-op thread, which forked ranks inherit: on the shared 2-core machine OpenMP's spinning
    threads of 2-4 processes slow the tiny models by orders of magnitude. The folders of multi-process
    tests use it for every test; ``_isolated_process_state`` restores the count."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A few real documents: six standard-library modules, copied so that the tests own their corpus."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("colorsys.py", "bisect.py", "keyword.py", "this.py", "shlex.py", "glob.py"):
        shutil.copy(stdlib / name, root / name)
    return root


@pytest.fixture
def plain_argv(monkeypatch):
    """LightningCLI warns when called with args while sys.argv holds pytest's own."""
    monkeypatch.setattr("sys.argv", ["dsv3"])
