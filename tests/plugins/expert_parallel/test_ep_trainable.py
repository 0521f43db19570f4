"""model.trainable under expert parallelism with ZeRO-1: frozen attention and the routed experts at a
tenth of the learning rate train like one process (losses and parameters 1e-5), the frozen weights
bit for bit unchanged on every rank's share."""

from __future__ import annotations

import torch
from ep_tiny import GLOBAL_BATCH, fit, make_module, make_tokens, relative_errors

TRAIN = make_tokens(3 * GLOBAL_BATCH)
OPTIONS = {"trainable": {"freeze": ["*.self_attn.*"], "expert_lr_scale": 0.1}}


def test_frozen_and_scaled_parameters_under_ep2_zero1_match_one_process(tmp_path) -> None:
    init = make_module(module_options=OPTIONS).state_dict()
    want_module, want_losses, _ = fit(
        tmp_path / "one", 1, 1, module=make_module(module_options=OPTIONS), windows=TRAIN
    )
    module, losses, _ = fit(
        tmp_path / "ep", 2, 2, module=make_module(module_options=OPTIONS), windows=TRAIN, zero1=True
    )
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    errors = relative_errors(module.state_dict(), want_module.state_dict())
    assert max(errors.values()) < 1e-5, max(errors, key=errors.get)
    moved = relative_errors(module.state_dict(), init)
    frozen = [k for k in init if ".self_attn." in k]
    assert frozen and all(moved[k] == 0 for k in frozen)
    assert moved["model.model.layers.1.mlp.experts.gate_up_proj"] > 0
    assert moved["model.model.layers.1.mlp.shared_experts.up_proj.weight"] > 0
