"""Node-limited routing (SPEC.md §4.1): each token's experts lie on at most M nodes.

DeepSeek-V3 ranks the nodes by the sum of the top K/M affinities of the experts each hosts and keeps
the best M. With experts laid out by rank (rank e hosts experts e·L .. e·L + L - 1) and expert
groups filling whole nodes (mesh.py), one node hosts a contiguous block of E / nodes experts: it
*is* one group of the router's group-limited routing, ``n_group = nodes``, ``topk_group = M``. So
this option does not add routing code; it sets (or checks) the routers' groups to coincide with
nodes, where "node" is ``ranks_per_node`` consecutive expert ranks (default: trainer.devices).

Differences from DeepSeek: the router scores a group by the sum of its top-2 biased affinities
(DeepSeek's and HF's code; equal to the paper's K/M only when K = 2M, V3's 8 = 2 × 4), and it is told
nothing about where the ranks actually are: pick ``ranks_per_node`` to match the hardware.
"""

from __future__ import annotations

import warnings

from dsv3_lightning.model.router import Router

KEY = "trainer.strategy.init_args"


def node_groups(expert_parallel_size: int, ranks_per_node: int) -> int:
    """Nodes spanned by one expert group, or a clear error when nodes do not tile it."""
    if ranks_per_node < 1 or expert_parallel_size % ranks_per_node:
        raise ValueError(
            f"{KEY}.ranks_per_node ({ranks_per_node}) must divide {KEY}.expert_parallel_size "
            f"({expert_parallel_size}) for node-limited routing: an expert group must fill whole nodes"
        )
    return expert_parallel_size // ranks_per_node


def apply_node_limit(routers: list[Router], max_nodes_per_token: int, nodes: int) -> str:
    """Makes every router's groups the nodes and keeps ``max_nodes_per_token`` of them per token.

    A router already configured with groups (``model.config.n_group`` > 1) must have exactly these
    groups; a router without groups gets them. Returns a one-line report.
    """
    if max_nodes_per_token < 1:
        raise ValueError(f"{KEY}.max_nodes_per_token ({max_nodes_per_token}) must be >= 1")
    if max_nodes_per_token >= nodes:
        warnings.warn(
            f"{KEY}.max_nodes_per_token ({max_nodes_per_token}) >= the {nodes} node(s) an expert group spans: "
            "node-limited routing changes nothing",
            stacklevel=2,
        )
        return f"node-limited routing: off (max_nodes_per_token {max_nodes_per_token} >= {nodes} nodes)"
    for router in routers:
        configured = router.n_group > 1 and router.topk_group < router.n_group
        if configured and (router.n_group, router.topk_group) != (nodes, max_nodes_per_token):
            raise ValueError(
                f"model.config.n_group ({router.n_group}) and topk_group ({router.topk_group}) do not match "
                f"node-limited routing over {nodes} nodes with {KEY}.max_nodes_per_token ({max_nodes_per_token}): "
                f"set model.config.n_group to {nodes} and topk_group to {max_nodes_per_token}, or leave n_group at 1 "
                "and let the strategy set them"
            )
        per_group = router.num_experts // nodes
        if router.scoring_func == "sigmoid" and per_group < 2:
            raise ValueError(
                f"node-limited routing scores a node by its top-2 experts, but each of the {nodes} nodes hosts "
                f"{per_group} expert of model.config.n_routed_experts ({router.num_experts}): use more experts or "
                f"a larger {KEY}.ranks_per_node"
            )
        if router.top_k > max_nodes_per_token * per_group:
            raise ValueError(
                f"model.config.num_experts_per_tok ({router.top_k}) experts do not fit on {KEY}.max_nodes_per_token "
                f"({max_nodes_per_token}) nodes of {per_group} experts: raise max_nodes_per_token"
            )
        router.n_group, router.topk_group = nodes, max_nodes_per_token
    return f"node-limited routing: {len(routers)} router(s), each token on at most {max_nodes_per_token} of {nodes} nodes"
