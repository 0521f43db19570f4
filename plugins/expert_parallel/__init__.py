"""Expert parallelism (SPEC.md §8): routed experts sharded over ranks, tokens moved by all-to-all.

- ``ExpertParallelStrategy`` (``strategy.py``): the Lightning strategy, a data × expert mesh.
- ``AllToAllTokenDispatcher`` (``dispatcher.py``): the MoE dispatch seam over an expert group.
- ``all_to_all`` (``all_to_all.py``): differentiable uneven all-to-all with clear errors.
- sharding and node-limited routing: ``sharding.py``, ``node_limited.py``.
- redundant experts: ``place_experts`` / ``ExpertPlacement`` (``placement.py``: where each expert's copies
  live, from recorded loads) and ``replicas.py`` (moving the copies in, dispatching to them). The mesh, the gradient
  synchronisation and the strategy base are the parallel layer's (``dsv3_lightning.plugins.parallel``).
"""

from dsv3_lightning.plugins.expert_parallel.all_to_all import ExpertParallelCommError, all_to_all
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.placement import ExpertPlacement, place_experts


def __getattr__(name: str):
    """``ExpertParallelStrategy`` on first use: it stands on the parallel layer, which imports this
    package's all-to-all and sharding, so importing it here would make that a cycle."""
    if name == "ExpertParallelStrategy":
        from dsv3_lightning.plugins.expert_parallel.strategy import ExpertParallelStrategy

        return ExpertParallelStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AllToAllTokenDispatcher",
    "ExpertParallelCommError",
    "ExpertParallelStrategy",
    "ExpertPlacement",
    "all_to_all",
    "place_experts",
]
