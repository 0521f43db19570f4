"""The 1F1B action lists (one stage per rank), to run on torch's action-list runtime.

torch's ``Schedule1F1B`` runs its own loop, and the action lists it reports
(``Schedule1F1B._get_pipeline_order`` in torch 2.13) number the last ranks' forwards from 1
(``1F1 1B0 1F2 ...`` for 2 ranks): they are not what it runs and cannot drive a runtime or a simulator.
So we write the classic lists here and run them with torch's ``ActionListRuntime``:

    Warm-up     N-1-r  x  F          rank r keeps N-r micro-batches in flight (peak activation N)
    Steady      M-N+1+r x F B
    Cool-down   N-1-r  x  B
"""

from __future__ import annotations

from dsv3_lightning.plugins.dualpipe.torch_pipelining import FORWARD, FULL_BACKWARD, Action


def one_f_one_b_actions(num_ranks: int, num_microbatches: int) -> dict[int, list[Action]]:
    out = {}
    for rank in range(num_ranks):
        warmup = min(num_ranks - 1 - rank, num_microbatches)
        actions = [Action(rank, FORWARD, m) for m in range(warmup)]
        for m in range(warmup, num_microbatches):  # steady: F(m), B(m - warmup)
            actions.append(Action(rank, FORWARD, m))
            actions.append(Action(rank, FULL_BACKWARD, m - warmup))
        actions.extend(
            Action(rank, FULL_BACKWARD, m) for m in range(num_microbatches - warmup, num_microbatches)
        )
        out[rank] = actions
    return out
