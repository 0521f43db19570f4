"""Resume on another mesh: a run of 2 data-parallel processes (gloo DDP), stopped at step 5 and
resumed by 1 process with another batch size (smaller, or larger than what is left of the epoch), trains on exactly the windows of the global stream that
follow, across the epoch boundary: no window is skipped or repeated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from dsv3_lightning.data import DSV3DataModule, PrepareSettings, prepare_corpus
from dsv3_lightning.data.sampling import CorpusOrder

from test_data import _write_corpus

SCRIPT = str(Path(__file__).with_name("resume_fit.py"))


def _run(*args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _steps(out: Path) -> dict[int, list[tuple[int, ...]]]:
    """Every rank's windows, grouped by the global step that trained on them."""
    steps: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    for file in out.glob("rank*.jsonl"):
        for line in file.read_text().splitlines():
            step, window = json.loads(line)
            steps[step].append(tuple(window))
    return steps


def test_two_processes_resumed_by_one_continue_the_global_stream(tmp_path: Path) -> None:
    _write_corpus(tmp_path / "corpus", num_files=3, num_words=150, seed=11)
    prepared = tmp_path / "prepared"
    prepare_corpus(PrepareSettings(data_path=str(tmp_path / "corpus"), vocab_size=300, val_fraction=0.2), prepared)
    dm = DSV3DataModule(data_path=str(prepared), vocab_size=300, seq_len=16, batch_size=2, seed=3)
    dm.setup("fit")
    windows = {tuple(dm.train_dataset[i].tolist()): i for i in range(len(dm.train_dataset))}
    num_windows = len(dm.train_dataset)
    assert len(windows) == num_windows and 30 <= num_windows <= 60  # each window recognisable; short epochs

    _run(str(prepared), str(tmp_path / "ddp"), "--devices", "2", "--batch_size", "2", "--max_steps", "5",
         "--save_at", "5", cwd=tmp_path)  # fmt: skip
    (ckpt,) = (tmp_path / "ddp" / "ckpt").glob("*.ckpt")
    before = _steps(tmp_path / "ddp")
    assert sorted(before) == list(range(5)) and all(len(before[s]) == 4 for s in before)
    # Batch 3: the interrupted epoch goes on, then the next ones. Batch 12: the 20 windows consumed are
    # more than the new epoch's N // 12 batches, so Lightning starts a fresh epoch at once.
    for batch in (3, 12):
        steps = 5 + 2 * num_windows // batch  # past two epoch boundaries of the stream
        out = tmp_path / f"one_batch{batch}"
        _run(str(prepared), str(out), "--batch_size", str(batch), "--max_steps", str(steps),
             "--ckpt_path", str(ckpt), cwd=tmp_path)  # fmt: skip
        after = _steps(out)
        assert sorted(after) == list(range(5, steps)) and all(len(after[s]) == batch for s in after)
        stream = CorpusOrder(num_windows, seed=3)(np.arange(5 * 4 + (steps - 5) * batch))
        position = 0
        for step in range(steps):
            seen = before[step] if step < 5 else after[step]
            expected = stream[position : position + len(seen)]
            assert sorted(windows[w] for w in seen) == sorted(expected.tolist()), f"batch {batch}, step {step}"
            position += len(seen)
        assert position >= 2 * num_windows  # two data epochs and more
