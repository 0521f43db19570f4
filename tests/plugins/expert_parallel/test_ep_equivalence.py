"""Same global batch and seed: 2 and 4 expert-parallel processes train like 1 process (losses,
parameters after several AdamW steps with global-norm clipping, balancing biases, validation
metrics at the end of the epoch: 1e-5 relative), with the optimizer state sharded (ZeRO-1) or not."""

from __future__ import annotations

import pytest
import torch
from ep_tiny import GLOBAL_BATCH, fit, make_module, make_tokens, relative_errors

TRAIN = make_tokens(3 * GLOBAL_BATCH)  # 3 steps: one epoch, then validation
VAL = make_tokens(2 * GLOBAL_BATCH, seed=1)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("single"), devices=1, expert_parallel_size=1, windows=TRAIN, val_windows=VAL)


@pytest.mark.parametrize(("devices", "expert_parallel_size", "zero1"), [(2, 2, False), (4, 2, False), (4, 2, True)])
def test_expert_parallel_run_matches_one_process(single, tmp_path, devices, expert_parallel_size, zero1):
    """zero1: 2 data x 2 expert ranks with ZeRO-1 (replicated states over 4 ranks, experts' over 2)."""
    want_module, want_losses, want_metrics = single
    module, losses, metrics = fit(
        tmp_path, devices, expert_parallel_size, windows=TRAIN, val_windows=VAL, zero1=zero1
    )
    assert len(losses) == len(want_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    assert {"val/loss", "val/accuracy", "val/mtp_loss"} <= metrics.keys()  # validation through the all-to-all
    for key, value in want_metrics.items():
        assert abs(metrics[key] - value) <= 1e-5 * abs(value), (key, metrics[key], value)
    errors = relative_errors(module.state_dict(), want_module.state_dict())
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])
    # the run trained: parameters moved away from the initialisation, expert weights included
    init = make_module().state_dict()
    moved = relative_errors(module.state_dict(), init)
    assert moved["model.model.layers.1.mlp.experts.gate_up_proj"] > 1e-3
    assert moved["model.model.layers.1.mlp.gate.e_score_correction_bias"] > 0  # balancing counts reduced


def test_gradient_accumulation_reduces_once_per_optimizer_step(tmp_path):
    """2 micro-batches per optimizer step: gradients summed locally, reduced and clipped once."""
    want, want_losses, _ = fit(tmp_path / "one", 1, 1, max_steps=2, accumulate_grad_batches=2)
    got, losses, _ = fit(tmp_path / "ep", 2, 2, max_steps=2, accumulate_grad_batches=2)
    assert len(losses) == 4  # micro-batches
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    errors = relative_errors(got.state_dict(), want.state_dict())
    assert max(errors.values()) < 1e-5, max(errors, key=errors.get)
