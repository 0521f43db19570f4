"""Node-limited routing: with the expert ranks' nodes as the router's groups, each token's experts lie
on at most M nodes, and the run equals group-limited routing on one process."""

from __future__ import annotations

import lightning as L
import torch
from dsv3_lightning.plugins.expert_parallel.node_limited import apply_node_limit
from ep_tiny import fit, make_module, relative_errors

UNGROUPED = {"n_group": 1, "topk_group": 1}


def test_a_router_without_groups_gets_the_nodes_and_routes_like_group_limited():
    nodes, per_node = 2, 4
    routers = make_module(mtp=False, **UNGROUPED).model.routers()
    apply_node_limit(routers, 1, nodes)
    reference = make_module(mtp=False, n_group=nodes, topk_group=1).model.routers()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    for router, want in zip(routers, reference):
        ids, weights = router(x[None])
        want_ids, want_weights = want(x[None])
        assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)
        assert (ids // per_node == ids[:, :1] // per_node).all()  # one node per token
    free_ids, _ = make_module(mtp=False, **UNGROUPED).model.routers()[0](x[None])
    assert ((free_ids // per_node) != (free_ids[:, :1] // per_node)).any()  # the limit did something


class OneNodePerToken(L.Callback):
    """Fails the run if any token of any MoE layer was sent to experts on two nodes (4 experts each)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for router in pl_module.model.routers():
            ids = router.last_stats.topk_ids_TK
            assert (ids // 4 == ids[:, :1] // 4).all(), "a token reached two nodes"


def test_two_nodes_one_per_token_matches_group_limited_on_one_process(tmp_path):
    want, want_losses, _ = fit(tmp_path / "one", 1, 1, module=make_module(n_group=2, topk_group=1), max_steps=2)
    got, losses, _ = fit(
        tmp_path / "ep", 2, 2, module=make_module(**UNGROUPED), max_steps=2,
        max_nodes_per_token=1, ranks_per_node=1, callbacks=[OneNodePerToken()],
    )
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    errors = relative_errors(got.state_dict(), want.state_dict())
    assert max(errors.values()) < 1e-5, max(errors, key=errors.get)
