"""FP8 routed experts: the grouped-matmul seam of ``GroupedExperts`` run through ``fp8_linear``.

Each expert's slice of the sorted tokens is one FP8 linear map (tiles along the hidden size for
Fprop, along the tokens of that expert for Wgrad); experts that received no token are skipped. When
none did (an expert-parallel rank whose experts got no token this step), the empty output is still
computed from the input, so that the backward reaches the dispatch's all-to-all on every rank alike. The
stacked weights stay the same Parameters, so checkpoints do not change.
"""

from __future__ import annotations

import torch
from dsv3_lightning.plugins.fp8.linear import fp8_linear
from dsv3_lightning.plugins.fp8.recipes import FP8Recipe

from dsv3_lightning.model.moe import GroupedExperts


class FP8GroupedExperts(GroupedExperts):
    recipe: FP8Recipe
    backend: str

    @classmethod
    def from_experts(cls, experts: GroupedExperts, recipe: FP8Recipe, backend: str) -> FP8GroupedExperts:
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.num_experts, new.expert_offset = experts.num_experts, experts.expert_offset
        new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
        new.recipe, new.backend = recipe, backend
        return new

    def grouped_mm(self, x_NI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        starts = [0, *offsets_E.tolist()]
        out = x_NI.new_zeros(x_NI.shape[0], w_EOI.shape[1])
        pieces = [
            fp8_linear(x_NI[starts[e] : starts[e + 1]], w_EOI[e], self.recipe, self.backend)
            if starts[e + 1] > starts[e]
            else None
            for e in range(len(w_EOI))
        ]
        present = [p for p in pieces if p is not None]
        if present:
            return torch.cat(present)
        # no token for any expert here: still an output of x and w, so that autograd runs the backward of
        # whatever produced x (an expert-parallel dispatch's all-to-all, which every peer rank runs too)
        return x_NI @ w_EOI[0].T if len(w_EOI) else out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, recipe={self.recipe.name}, backend={self.backend}"
