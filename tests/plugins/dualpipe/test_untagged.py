"""Our runtime and pipeline evaluation send no point-to-point tags, and every pair of ranks posts its
messages in one order: what makes untagged matching (NCCL's) correct.

On 2 and 4 gloo processes, ``dualpipe`` and an overlapped ``dualpipev`` (our runtime, InterleavedOverlap)
train one step and evaluate one batch with torch.distributed's ``isend``, ``irecv``, ``send``, ``recv``
and ``P2POp`` wrapped to fail on any nonzero tag; losses and gradients equal the single-process
reference as in test_equivalence.py. The wrappers record every posted point-to-point operation as
(src, dst, shape): for each ordered pair of ranks, the sends of one equal the receives of the other,
in order. ``check_exchanges`` replays the exchange order of every plan the tests use (and more) by
matching alone: no deadlock, no mismatched message; and it does fail on an order that deadlocks.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from dsv3_lightning.plugins.dualpipe.bidirectional_runtime import check_exchanges, exchanges
from dsv3_lightning.plugins.dualpipe.evaluation import pipeline_evaluate
from dsv3_lightning.plugins.dualpipe.overlap import InterleavedOverlap
from dsv3_lightning.plugins.dualpipe.plans import build_plan
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from dualpipe_tiny import assert_gradients_match, make_module, make_tokens, reference, runs_per_world

CASES = {  # world size -> (schedule, num_microbatches, num_hidden_layers, overlapped)
    2: [("dualpipe", 4, 4, False), ("dualpipev", 4, 4, True)],
    4: [("dualpipe", 8, 4, False), ("dualpipev", 8, 8, True)],
}
BATCH = 8


class TaggedMessage(AssertionError):
    pass


def _untagged(log: list[tuple[str, int, int, tuple[int, ...]]]):
    """Replaces c10d's point-to-point functions (and torch.distributed's names of them) by wrappers that
    fail on a nonzero tag and append (op, src, dst, shape) to ``log``; returns the undo."""
    originals = {name: getattr(c10d, name) for name in ("isend", "irecv", "send", "recv")}
    p2p_init = c10d.P2POp.__init__

    depth = [0]  # only the outermost call is recorded (dist.recv calls irecv)

    def wrap(name, fn):
        signature = inspect.signature(fn)
        peer_arg = "dst" if "send" in name else "src"

        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            if bound.get("tag"):
                raise TaggedMessage(f"dist.{name} with tag {bound['tag']}")
            if depth[0] == 0:
                peer = bound.get(peer_arg)
                if peer is None:
                    peer = dist.get_global_rank(bound.get("group") or dist.group.WORLD, bound[f"group_{peer_arg}"])
                me, shape = dist.get_rank(), tuple(bound["tensor"].shape)
                log.append(("send", me, peer, shape) if "send" in name else ("recv", peer, me, shape))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        wrapper.__name__ = name
        return wrapper

    def init(self, op, tensor, peer=None, group=None, tag=0, group_peer=None):
        if tag:
            raise TaggedMessage(f"P2POp with tag {tag}")
        p2p_init(self, op, tensor, peer, group, tag, group_peer)

    for name, fn in originals.items():
        w = wrap(name, fn)
        setattr(c10d, name, w)  # batch_isend_irecv calls c10d's isend/irecv (``op.op is isend``)
        setattr(dist, name, w)
    c10d.P2POp.__init__ = init

    def undo() -> None:
        for name, fn in originals.items():
            setattr(c10d, name, fn)
            setattr(dist, name, fn)
        c10d.P2POp.__init__ = p2p_init

    return undo


def _worker(rank: int, world: int, out_dir: str) -> None:
    tokens = make_tokens(BATCH)
    for schedule, m, layers, overlapped in CASES[world]:
        module = make_module(layers)
        hook = InterleavedOverlap() if overlapped else None
        runner = PipelineRunner(module, build_plan(schedule, world, m), overlap=hook)
        log: list = []
        undo = _untagged(log)
        try:
            losses = runner.run_schedule(tokens)
            train_log = list(log)
            pipeline_evaluate(runner, tokens, "val")
            eval_log = log[len(train_log):]
        finally:
            undo()
        runner.sync_gradients()
        mine = runner.local_parameter_names()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if n in mine and p.grad is not None}
        torch.save(
            {"losses": losses, "grads": grads, "train": train_log, "eval": eval_log},
            os.path.join(out_dir, f"{schedule}-{rank}.pt"),
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return runs_per_world(tmp_path_factory, _worker, "untagged")


ALL = [(world, i) for world in CASES for i in range(len(CASES[world]))]
IDS = [f"{world}procs-{CASES[world][i][0]}{'-overlap' if CASES[world][i][3] else ''}" for world, i in ALL]


def _results(runs, world, index):
    schedule = CASES[world][index][0]
    return [torch.load(runs(world) / f"{schedule}-{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("world,index", ALL, ids=IDS)
def test_untagged_steps_match_one_process(runs, world, index):
    schedule, m, layers, _ = CASES[world][index]
    results = _results(runs, world, index)  # a tagged message would have failed the processes
    want_losses, want_grads = reference(make_module(layers), make_tokens(BATCH), m)
    losses = {}
    for res in results:
        losses.update(res["losses"])
        assert res["train"], "the step posted no point-to-point operation through the wrappers"
    assert sorted(losses) == list(range(m))
    torch.testing.assert_close(torch.stack([losses[i] for i in range(m)]), want_losses, rtol=0, atol=0)
    assert_gradients_match([res["grads"] for res in results], want_grads, 1e-6, schedule)


@pytest.mark.parametrize("phase", ["train", "eval"])
@pytest.mark.parametrize("world,index", ALL, ids=IDS)
def test_each_pair_of_ranks_posts_its_messages_in_one_order(runs, world, index, phase):
    results = _results(runs, world, index)
    pairs = 0
    for a in range(world):
        for b in range(world):
            sent = [shape for op, src, dst, shape in results[a][phase] if op == "send" and dst == b]
            received = [shape for op, src, dst, shape in results[b][phase] if op == "recv" and src == a]
            assert all(src == a for op, src, _, _ in results[a][phase] if op == "send")
            assert sent == received, f"{phase}: rank {a} sends {len(sent)} to {b}, which receives {len(received)}"
            pairs += bool(sent)
    assert pairs >= world - 1


@pytest.mark.parametrize(
    "schedule,sizes", [("dualpipe", (2, 4, 6, 8)), ("dualpipev", (2, 3, 4, 8)), ("1f1b", (2, 4)), ("zb", (2, 4))]
)
def test_exchanges_match_and_never_deadlock(schedule, sizes):
    checked = 0
    for n in sizes:
        for m in range(2 * n, 4 * n + 3):
            try:
                plan = build_plan(schedule, n, m)
            except ValueError:  # a count the schedule refuses
                continue
            check_exchanges(plan)
            checked += 1
    assert checked >= len(sizes)


def test_the_exchange_check_finds_a_deadlock_and_a_mismatch():
    plan = build_plan("dualpipe", 2, 4)
    posted = exchanges(plan)
    swapped = {**posted, 0: [posted[0][1], posted[0][0], *posted[0][2:]]}  # rank 0 waits for the later one
    with pytest.raises(AssertionError, match="deadlock|runs before|sends"):
        check_exchanges(plan, swapped)
    i, j = next((i, j) for i, ex in enumerate(posted[1]) for j, op in enumerate(ex.ops) if op.send)
    ex, op = posted[1][i], posted[1][i].ops[j]  # rank 1 sends another micro-batch than rank 0 expects
    wrong = dataclasses.replace(op, message=dataclasses.replace(op.message, microbatch=op.message.microbatch + 1))
    ops = (*ex.ops[:j], wrong, *ex.ops[j + 1 :])
    changed = [*posted[1][:i], dataclasses.replace(ex, ops=ops), *posted[1][i + 1 :]]
    with pytest.raises(AssertionError, match=r"rank 1 sends .* where rank 0 receives"):
        check_exchanges(plan, {**posted, 1: changed})
