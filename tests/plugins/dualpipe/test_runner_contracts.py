"""PipelineRunner's input checks, each with the YAML key and the fix, and how a conversation batch is cut
into micro-batches."""

from __future__ import annotations

import pytest
from dsv3_lightning.plugins.dualpipe.runner import split_microbatches
from dualpipe_tiny import make_tokens


def test_a_batch_the_microbatches_do_not_divide_is_refused_with_the_fix():
    assert [mb.shape[0] for mb in split_microbatches(make_tokens(8), 4)] == [2, 2, 2, 2]
    with pytest.raises(
        ValueError,
        match=r"batch has 6 windows, not a multiple of .*num_microbatches \(4\); "
        r"set data.batch_size to a multiple of 4",
    ):
        split_microbatches(make_tokens(6), 4)


def _conversation_batch(rows: int, seed: int = 3):
    import torch
    from dualpipe_tiny import SEQ

    from dsv3_lightning.batch import Batch

    g = torch.Generator().manual_seed(seed)
    documents = torch.arange(SEQ + 2).div(4, rounding_mode="floor").expand(rows, -1).clone()
    loss_mask = torch.rand(rows, SEQ + 2, generator=g) < torch.linspace(0.1, 0.9, rows)[:, None]
    raw = {"tokens": make_tokens(rows, seed), "loss_mask": loss_mask, "documents": documents}
    return Batch.read(raw, SEQ, offsets=2)


def test_a_conversation_batchs_microbatches_keep_the_global_counts():
    # micro-batch m's loss is its masked sum x M x R / the whole batch's count: the 1/M-weighted sum over
    # the micro-batches is the whole batch's mean, however unequally the targets fall into them
    import torch

    batch = _conversation_batch(8)
    mbs = split_microbatches(batch, 4)
    counts = [int(mb.target_mask().sum()) for mb in mbs]
    assert len(set(counts)) > 1 and all(mb.counts is batch.counts and mb.replicas == 4 for mb in mbs), counts
    values = torch.rand(8, batch.seq_len, dtype=torch.float64)
    whole = batch.mean(values)
    assert torch.allclose(sum(mb.mean(v) for mb, v in zip(mbs, values.chunk(4))) / 4, whole, rtol=1e-12)
    assert torch.equal(torch.cat([mb.documents for mb in mbs]), batch.documents)
    with pytest.raises(ValueError, match=r"batch has 6 windows, not a multiple of .*num_microbatches \(4\)"):
        split_microbatches(_conversation_batch(6), 4)


def test_conversation_windows_too_short_for_the_heads_are_refused_with_the_fix():
    from dsv3_lightning.plugins.dualpipe import DualPipeStrategy
    from dualpipe_tiny import make_module

    strategy = DualPipeStrategy(2, 4, "1f1b")
    strategy.connect(make_module(4))  # MTP depth 1: windows need S + 2 tokens
    whole = _conversation_batch(4)
    batch = {key: getattr(whole, key)[:, :2] for key in ("tokens", "loss_mask", "documents")}
    with pytest.raises(ValueError, match=r"windows of 2 tokens are too short .* set data.extra_tokens to 1"):
        strategy.read_batch(batch)


def _count_collectives(rank: int, world: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from dsv3_lightning.plugins.dualpipe import runner as runner_module
    from dsv3_lightning.plugins.dualpipe.plans import build_plan
    from dualpipe_tiny import make_module

    from dsv3_lightning.plugins.dualpipe.evaluation import pipeline_evaluate

    calls = {"all_gather_object": 0, "all_reduce_devices": set(), "broadcast_object_list": 0}
    real_gather, real_reduce, real_broadcast = dist.all_gather_object, dist.all_reduce, dist.broadcast_object_list

    def broadcast_object_list(*args, **kwargs):
        calls["broadcast_object_list"] += 1
        return real_broadcast(*args, **kwargs)

    def all_gather_object(*args, **kwargs):
        calls["all_gather_object"] += 1
        return real_gather(*args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        calls["all_reduce_devices"].add(str(tensor.device))
        return real_reduce(tensor, *args, **kwargs)

    runner_module.dist.all_gather_object, runner_module.dist.all_reduce = all_gather_object, all_reduce
    dist.broadcast_object_list = broadcast_object_list
    try:
        module = make_module(4)
        runner = runner_module.PipelineRunner(module, build_plan("1f1b", world, 4), device=torch.device("cpu"))
        per_step = []
        for _ in range(3):
            before = calls["all_gather_object"]
            logs, count = runner.train_step(make_tokens(8))
            per_step.append(calls["all_gather_object"] - before)
            module.zero_grad(set_to_none=True)
        per_eval, val_logs = [], None
        for _ in range(3):
            before = calls["broadcast_object_list"]
            val_logs = pipeline_evaluate(runner, make_tokens(8), "val")
            per_eval.append(calls["broadcast_object_list"] - before)
        torch.save({"per_step": per_step, "devices": sorted(calls["all_reduce_devices"]), "keys": sorted(logs),
                    "per_eval": per_eval, "val_logs": {k: float(v) for k, v in val_logs.items()}},
                   f"{out_dir}/{rank}.pt")
    finally:
        runner_module.dist.all_gather_object, runner_module.dist.all_reduce = real_gather, real_reduce
        dist.broadcast_object_list = real_broadcast


def test_steps_after_the_first_run_no_object_collective(tmp_path):
    # NCCL rules: object collectives pickle through the CPU and synchronise the host; the heads name
    # their logs (PredictionHead.log_names), so training exchanges none, and every collective takes
    # tensors on the runner's device.
    import torch
    from dualpipe_tiny import fork_ranks

    fork_ranks(_count_collectives, 2, tmp_path)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["per_step"] == [0, 0, 0], result  # the MTP head names its logs: no exchange
        assert result["devices"] == ["cpu"]
        assert "ce" in result["keys"]
        assert result["per_eval"] == [0, 0, 0], result  # validation: the MTP head names its logs too
    zero, one = (torch.load(tmp_path / f"{rank}.pt")["val_logs"] for rank in (0, 1))
    assert zero == one and zero  # every rank logs the last piece's values (the MTP head's)
