"""The model cut by layer ranges: embedding first; final norm, lm_head and MTP last; clear errors."""

from __future__ import annotations

import pytest
import torch
from dsv3_lightning.plugins.dualpipe.partition import build_pieces, parameter_names, split_layers
from dualpipe_tiny import make_module, make_tokens


def test_layer_ranges_cover_every_layer_once_extras_in_the_middle():
    assert split_layers(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_layers(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]  # ends also embed / run the head
    assert split_layers(61, 16)[0] == (0, 3) and split_layers(61, 16)[-1] == (58, 61)  # V3: 61 = 16 x 3 + 13
    for layers, pieces in [(61, 16), (7, 3), (5, 5), (9, 2)]:
        bounds = split_layers(layers, pieces)
        assert (
            [a for a, _ in bounds[1:]] == [b for _, b in bounds[:-1]]
            and bounds[0][0] == 0
            and bounds[-1][1] == layers
        )
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_more_stages_than_layers_is_refused_with_the_fix():
    with pytest.raises(
        ValueError,
        match=r"num_hidden_layers \(4\) is smaller than the number of pipeline stages "
        r"\(8 \(2 per rank under schedule 'dualpipev'\)\).*lower "
        r"trainer.strategy.init_args.pipeline_parallel_size",
    ):
        build_pieces(make_module(), 8, schedule="dualpipev", ranks=4)


def test_embedding_first_head_and_mtp_last():
    module = make_module()
    pieces = build_pieces(module, 4)
    names = [parameter_names(p, module) for p in pieces]
    assert "model.model.embed_tokens.weight" in names[0]
    assert {"model.lm_head.weight", "model.model.norm.weight"} <= names[3]
    assert any(n.startswith("heads.0.") for n in names[3])
    assert "model.model.embed_tokens.weight" in names[3]  # MTP embeds its shifted inputs
    assert not any(n.startswith("heads.") or "lm_head" in n for n in names[0] | names[1] | names[2])
    assert all(any(f"layers.{i}." in n for n in names[i]) for i in range(4))
    everything = {n for n, _ in module.named_parameters()}
    assert set().union(*names) == everything


def test_pieces_compose_to_the_models_loss():
    module = make_module()
    tokens = make_tokens(2)
    pieces = build_pieces(module, 2)
    with torch.no_grad():
        loss = pieces[1](pieces[0](tokens, tokens), tokens)
        inputs, targets = module._split(tokens)
        out = module.model(inputs)
        want = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
        want = want + module.heads[0](out.hidden_states, module.read_batch(tokens), module.model, stage="train", step=0).loss
    assert torch.equal(loss, want)
    assert pieces[1].logs[-1]["loss"] == loss and set(pieces[1].logs[-1]) == {
        "loss",
        "ce",
        "mtp_loss",
        "mtp_loss/depth_1",
    }
