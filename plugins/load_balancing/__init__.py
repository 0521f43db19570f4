"""Load balancing of the routed experts: DeepSeek-V3's bias update, balance losses, load metrics.

Each is a Lightning callback, usable alone or together from YAML (``trainer.callbacks``):

- ``AuxLossFreeBalancing``: the auxiliary-loss-free selection-bias update (SPEC.md §4.2).
- ``SequenceBalanceLoss``: V3's complementary sequence-wise balance loss, α = 1e-4 (§4.3).
- ``AuxBalanceLoss``: the classic batch-level auxiliary loss that DeepSeek compared against.
- ``ExpertLoadMonitor``: MaxVio per step and over the validation set, dead experts, a heat map.
"""

from dsv3_lightning.plugins.load_balancing.bias import AuxLossFreeBalancing, update_bias
from dsv3_lightning.plugins.load_balancing.losses import AuxBalanceLoss, SequenceBalanceLoss, balance_loss
from dsv3_lightning.plugins.load_balancing.metrics import ExpertLoad, ExpertLoadMonitor, max_violation

__all__ = [
    "AuxBalanceLoss",
    "AuxLossFreeBalancing",
    "ExpertLoad",
    "ExpertLoadMonitor",
    "SequenceBalanceLoss",
    "balance_loss",
    "max_violation",
    "update_bias",
]
