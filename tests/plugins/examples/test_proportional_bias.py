"""The proportional bias-update example: its rule, and a run from plugins/examples/proportional_bias.yaml."""

from __future__ import annotations

import torch
from dsv3_lightning.plugins.examples.proportional_bias import ProportionalBiasBalancing
from dsv3_lightning.plugins.load_balancing import AuxLossFreeBalancing, update_bias


def test_rule_is_proportional_to_the_relative_load_error():
    counts_LE = torch.tensor([[0, 2, 4, 10], [5, 5, 5, 5], [0, 0, 0, 0]])
    step_LE = ProportionalBiasBalancing().bias_step(counts_LE, 0.1)
    # layer 0: mean 4, step 0.1 · (4 − c) / 4; a balanced layer and an empty one do not move
    expected = torch.tensor([[0.1, 0.05, 0.0, -0.15], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(step_LE, expected)
    assert not torch.allclose(step_LE, update_bias(counts_LE, 0.1))  # V3's sign rule: 0.1, 0.1, 0, -0.1


def test_runs_from_yaml(fit_example):
    cli = fit_example("proportional_bias.yaml", 3)
    assert cli.trainer.global_step == 3
    balancers = [c for c in cli.trainer.callbacks if isinstance(c, AuxLossFreeBalancing)]
    assert [type(c) for c in balancers] == [ProportionalBiasBalancing]
    rate = balancers[0].update_rate
    biases_LE = torch.stack([r.e_score_correction_bias for r in cli.model.model.routers()])
    assert biases_LE.abs().max() > 0
    # Every step of this rule sums to zero over a layer's experts, so the biases do too ...
    torch.testing.assert_close(biases_LE.sum(-1), torch.zeros(len(biases_LE)), atol=1e-8, rtol=0)
    # ... and they are not V3's, which after 3 steps leaves every bias a whole multiple of the rate.
    in_rates = biases_LE / rate
    assert (in_rates - in_rates.round()).abs().max() > 1e-3
