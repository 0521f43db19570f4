"""AdamWBF16: AdamW whose moments are stored in bfloat16 (SPEC.md §6.1), master weights in float32.

DeepSeek-V3 keeps AdamW's first and second moments in BF16 "without observable degradation", which
halves the optimizer state: 4 bytes per parameter instead of 8. The update itself runs in float32:
each step loads the moments, updates them in float32, applies the decoupled weight decay and the
bias-corrected step to the float32 parameter, and stores the moments back rounded to bfloat16.

    optimizer:
      class_path: dsv3_lightning.plugins.fp8.AdamWBF16
      init_args: {lr: 0.003, betas: [0.9, 0.95], weight_decay: 0.1}

Used from YAML like this, it replaces the module's default AdamW (and its parameter groups: weight
decay then applies to every parameter). ``state_bytes()`` reports the optimizer-state memory.
"""

from __future__ import annotations

import torch


class AdamWBF16(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
    ) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"optimizer.init_args: lr ({lr}) and eps ({eps}) must be > 0, weight_decay ({weight_decay}) >= 0, "
                f"betas ({betas}) in [0, 1)"
            )
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                bias1 = 1 - beta1 ** state["step"]
                bias2 = 1 - beta2 ** state["step"]
                update = (m / bias1) / ((v / bias2).sqrt_().add_(group["eps"]))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``Optimizer.load_state_dict`` casts floating-point state to each parameter's dtype:
        the moments come back in float32, then hold unrounded values (a resumed run would part from the
        uninterrupted one) and twice the memory. They are cast back; bfloat16 -> float32 -> bfloat16 is
        exact."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    def state_bytes(self) -> int:
        """Bytes of optimizer state (the two moments), to compare with 8 bytes per parameter of AdamW."""
        return sum(
            t.numel() * t.element_size() for s in self.state.values() for t in s.values() if torch.is_tensor(t)
        )
