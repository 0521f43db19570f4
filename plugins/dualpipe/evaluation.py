"""Validation and test through the pipeline: a plain forward of the first chain, no schedule.

Evaluation has no backward to hide bubbles behind, so it runs each batch through the pieces of the
first chain in order (stage s's rank receives h from stage s-1's rank, unless both stages are on
one rank as at DualPipeV's turn); with a conversation batch (a ``Batch`` read with the global
counts, as for training) every piece attends inside the packed documents. The rank of the last
piece computes what ``DSV3LightningModule._evaluate`` computes: per-token CE and top-1 hits into the
module's torchmetrics, weighted by the target mask (``Batch.target_weights``: the mean over the
answer tokens; the other ranks update with nothing, so that the epoch-end sync sums every rank), and
the heads' evaluation logs, which it broadcasts (one tensor; their names once) so that every rank
logs the same values.

The hand-overs carry no tag (NCCL ignores tags and matches a pair's messages in posting order): only
one rank computes at a time, each rank posts its receive before the send that answers it can be made,
and two ranks exchange at most one message per direction per batch (a linear chain or the first of
``dualpipe``'s two: r to r+1 only; the V: r to r+1 on the way down, r+1 to r on the way up), so the
k-th send from A to B always meets the k-th receive on B from A.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner

from dsv3_lightning.batch import Batch


@torch.no_grad()
def pipeline_evaluate(
    runner: PipelineRunner, batch: torch.Tensor | Batch, stage_name: str
) -> dict[str, torch.Tensor]:
    """Updates ``module.val_loss`` / ``val_accuracy`` on the last piece's rank with ``batch`` (windows
    [B, S+1+extra], or a conversation batch read with its global counts); returns the heads' logs
    (``{stage_name}/key``), identical on every rank."""
    module, layout, group = runner.module, runner.layout, runner.group
    batch = module.read_batch(batch) if isinstance(batch, torch.Tensor) else batch
    inputs, targets, device = batch.inputs, batch.targets(), batch.tokens.device
    chain = layout.chains[0]
    h = None
    last_rank = layout.stage_to_rank[chain[-1]]
    for i, stage in enumerate(chain):
        rank = layout.stage_to_rank[stage]
        if rank != runner.rank:
            continue
        piece = runner.pieces[layout.piece(stage)]
        if i == 0:
            h = module.model.embed(inputs)
        elif layout.stage_to_rank[chain[i - 1]] != rank:
            h = torch.empty(
                *inputs.shape,
                module.config.hidden_size,
                device=device,
                dtype=module.model.model.embed_tokens.weight.dtype,
            )
            src = dist.get_global_rank(group, layout.stage_to_rank[chain[i - 1]])
            dist.recv(h, src, group=group)
        h = module.model.run_layers(h, *piece.layer_range, documents=batch.input_documents)
        if i + 1 < len(chain) and layout.stage_to_rank[chain[i + 1]] != rank:
            dst = dist.get_global_rank(group, layout.stage_to_rank[chain[i + 1]])
            dist.send(h.contiguous(), dst, group=group)
    logs: dict[str, torch.Tensor] = {}
    if runner.rank == last_rank:
        logits = module.model.head(h)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        weights = batch.target_weights()  # 1.0 without a mask
        module.val_loss.update(losses, weights)
        module.val_accuracy.update((logits.argmax(-1) == targets).float().flatten(), weights)
        for head in module.heads:
            out = head(h, batch, module.model, stage=stage_name, step=module.global_step)
            logs.update({f"{stage_name}/{k}": v.detach().float().reshape(()) for k, v in out.logs.items()})
    else:
        empty = torch.empty(0, device=device)
        module.val_loss.update(empty)
        module.val_accuracy.update(empty)
    return _share(runner, logs, stage_name, dist.get_global_rank(group, last_rank), device)


def _share(
    runner: PipelineRunner, logs: dict[str, torch.Tensor], stage_name: str, src: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The last piece's logs on every rank: one tensor broadcast on ``device`` (NCCL's rule). The heads
    name their logs (``PredictionHead.log_names``); for a head that does not, the last piece's rank
    sends the names once per stage name (an object broadcast), and they are kept."""
    keys = runner.eval_log_keys.get(stage_name)
    if keys is None and (named := runner.log_names(stage_name)) is not None:
        keys = runner.eval_log_keys[stage_name] = sorted(f"{stage_name}/{k}" for k in named)
    if keys is None:
        box = [sorted(logs)]
        dist.broadcast_object_list(box, src, group=runner.group)
        keys = runner.eval_log_keys[stage_name] = box[0]
    if not keys:
        return {}
    values = torch.empty(len(keys), device=device)
    if logs:
        values.copy_(torch.stack([logs[k].to(device) for k in keys]))
    dist.broadcast(values, src, group=runner.group)
    return dict(zip(keys, values))
