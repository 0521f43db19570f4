"""What to train (``model.trainable``): freezing parameters by name, and the routed experts' learning rate.

Fine-tuning a DeepSeekMoE model usually trains part of it: attention and the shared experts with the
routed experts frozen, or only the last layers. ``freeze`` and ``train`` are shell-style patterns
(``fnmatch``) over the LightningModule's parameter names, as ``named_parameters()`` gives them
(``model.model.layers.3.self_attn.q_a_proj.weight``, ``model.model.layers.3.mlp.experts.gate_up_proj``
(the stacked routed experts), ``model.lm_head.weight``, ``heads.0.…`` for the MTP modules). A parameter
is frozen when a ``freeze`` pattern matches it and no ``train`` pattern does::

    model:
      trainable:
        freeze: ["*.mlp.experts.*"]                            # the routed experts
    # or: everything but the last layer and the output head
        freeze: ["*"]
        train: ["model.model.layers.3.*", "model.model.norm.*", "model.lm_head.*"]
        expert_lr_scale: 0.1                                    # routed experts at a tenth of the rate

Patterns are checked against the whole model when the module is built (a pattern that matches
nothing is refused, naming its key), and applied where each rank holds its share, after the weights
have their values (``configure_model``): frozen parameters get ``requires_grad=False``, so the default
optimizer, the strategies' gradient synchronisation and ZeRO-1 leave them out. The counts of
trainable parameters are logged at the start of ``fit``.

The selection bias (``e_score_correction_bias``) is a buffer, not a parameter: the balancing callback
decides whether it still moves (``AuxLossFreeBalancing(update_rate=0)`` or ``freeze_at_step``, or
leave the callback out).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

_KEY = "model.trainable"
ROUTED_EXPERTS = "*.mlp.experts.*"
"""The routed experts' stacked weights (shared experts are ``mlp.shared_experts``)."""


@dataclass(kw_only=True)
class Trainable:
    """Which parameters train, and at what learning rate (module docstring)."""

    freeze: list[str] = field(default_factory=list)
    """Patterns of parameter names to freeze, e.g. ``["*.mlp.experts.*"]`` for the routed experts."""
    train: list[str] = field(default_factory=list)
    """Patterns kept trainable even where a ``freeze`` pattern matches, e.g. the last layer's."""
    expert_lr_scale: float = 1.0
    """The routed experts' learning rate as a fraction of ``model.learning_rate`` (their own group)."""

    def __post_init__(self) -> None:
        if not self.expert_lr_scale > 0:
            raise ValueError(
                f"{_KEY}.expert_lr_scale ({self.expert_lr_scale}) must be > 0: freeze the experts with "
                f"{_KEY}.freeze ['{ROUTED_EXPERTS}'] instead of a zero learning rate"
            )
        if self.train and not self.freeze:
            raise ValueError(f"{_KEY}.train ({self.train}) only exempts parameters from {_KEY}.freeze, which is empty")

    def options(self) -> dict:
        return dataclasses.asdict(self)

    def is_frozen(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.freeze) and not any(fnmatchcase(name, p) for p in self.train)

    def check(self, module: nn.Module) -> tuple[int, int]:
        """Refuse patterns that match no parameter of ``module`` (the whole model); returns the
        (trainable, total) parameter counts it would have."""
        names = [name for name, _ in module.named_parameters()]
        for key in ("freeze", "train"):
            for i, pattern in enumerate(getattr(self, key)):
                if not any(fnmatchcase(n, pattern) for n in names):
                    raise ValueError(
                        f"{_KEY}.{key}[{i}] ({pattern!r}) matches no parameter. Names look like "
                        f"{names[1]!r} or {next((n for n in names if '.experts.' in n), names[-1])!r}; "
                        "patterns are fnmatch's (* matches dots too)."
                    )
        total = sum(p.numel() for p in module.parameters())
        frozen = sum(p.numel() for n, p in module.named_parameters() if self.is_frozen(n))
        return total - frozen, total

    def apply(self, module: nn.Module) -> None:
        """Set ``requires_grad`` of the parameters this process holds."""
        for name, param in module.named_parameters():
            if self.is_frozen(name):
                param.requires_grad_(False)

    def is_routed_expert(self, name: str) -> bool:
        return fnmatchcase(name, ROUTED_EXPERTS)
