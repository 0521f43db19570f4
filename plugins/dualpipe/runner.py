"""PipelineRunner: one training step of a DSV3LightningModule under a pipeline schedule, on one rank.

    runner = PipelineRunner(module, plan, group)          # plan = build_plan(schedule, N, M)
    logs, count = runner.train_step(batch)                 # the pipeline's whole batch; same on its ranks

builds this rank's stages and the schedule that runs the plan's action lists:

    1f1b        torch PipelineStage x1, torch ActionListRuntime fed our lists (baseline_actions.py)
    zb          torch PipelineStage x1, torch ScheduleInterleavedZeroBubble
    dualpipev   torch PipelineStage x2, torch ScheduleDualPipeV; with ``overlap``: ScheduleDualPipeV's lists
                on BidirectionalRuntime (ours), whose (F;B) pairs the hook runs
    dualpipe    BidirectionalRuntime (ours), 2 pieces per rank, each piece on 2 ranks; (F;B) pairs by ``overlap``

``runner.pipeline_order`` is the compute-only action lists the schedule object really runs (for the
torch schedules, read back from it), which ``simulate`` accepts. After the schedule, every parameter
used on more than one rank (the DualPipe copies; the embedding when MTP sits on another rank than
it) has its gradient summed over the pipeline group; a parameter used on one rank only keeps its
gradient there and has none elsewhere (so the optimizer leaves that rank's copy alone). Each rank
holds the whole module (simple checkpoints, see ``full_state_dict``); only its pieces are computed.

``train_step`` returns each rank's sums of the micro-batch logs (training loss, ``ce``, the heads'
``mtp_loss`` ..., from the ranks that hold last stages) and of its layers' loss terms (balance
losses, computed by each router on its own rank), with their count; the strategy turns them into the
global batch's means in one all-reduce over all processes (``DSV3LightningModule.log_train``), the
same numbers one process computes on the whole batch when micro-batches are equal in size.

A batch is plain windows [B, S+1+extra] (pre-training) or a conversation batch read as a ``Batch``
with the global batch's target counts (the strategy reads it, one all-reduce per step; batch.py).
``split_microbatches`` cuts it into the M micro-batches, tensors or ``Batch.split``'s (each keeping
the global counts, so that its loss is its masked sum × M × R / global count), and every stage gets
its micro-batch as the keyword ``tokens`` (partition.py). Our runtime takes that list. torch's
schedules split what ``step`` is given themselves, along dim 0 (a dict's tensors too, by pytree; a
dataclass such as ``Batch`` would be handed whole to every micro-batch), so they are given the token
windows only, which feed the first stage's positional input, ``target`` (unused) and the shape
inference, and ``_Stage`` hands its piece our micro-batch of the index torch runs instead: one split,
the same micro-batches on either runtime.

torch's stages run one extra forward of the first micro-batch at their first step, to infer the
shapes they exchange (on empty tensors for all but the first stage, and the plain token windows,
which give the same shapes): its logs are dropped, and its routing is neither counted nor given loss
terms (``_Stage``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.dualpipe.bidirectional_runtime import BidirectionalRuntime
from dsv3_lightning.plugins.dualpipe.overlap import OverlapHook
from dsv3_lightning.plugins.dualpipe.partition import build_pieces, parameter_names
from dsv3_lightning.plugins.dualpipe.plans import SchedulePlan, compute_only, plan_spec
from dsv3_lightning.plugins.dualpipe.torch_pipelining import PipelineStage
from dsv3_lightning.plugins.dualpipe.torch_pipelining import ActionListRuntime

from dsv3_lightning.batch import Batch
from dsv3_lightning.model.router import statistics_paused
from dsv3_lightning.module import DSV3LightningModule

_KEY = "trainer.strategy.init_args"


class _Stage(PipelineStage):
    """torch's stage, run on our micro-batches (``microbatches``, set by the runner every step: the
    forward of micro-batch m gets ``tokens=microbatches[m]``), whose first-step forward to infer
    shapes leaves no trace in the routers' statistics."""

    microbatches: list[torch.Tensor] | list[Batch] = []

    def forward_one_chunk(self, fwd_chunk_id: int, args, kwargs=None, *rest, **options):
        kwargs = {**(kwargs or {}), "tokens": self.microbatches[fwd_chunk_id]}
        return super().forward_one_chunk(fwd_chunk_id, args, kwargs, *rest, **options)

    def _forward_metadata_inference(self, *args, **kwargs):
        with statistics_paused(self.submod):
            return super()._forward_metadata_inference(*args, **kwargs)


class _ScaledLoss:
    """The schedules' ``loss_fn``: the last piece already returns the micro-batch's loss; weigh it 1/M.

    Scaling here, not with torch's ``scale_grads`` (which divides each stage's gradients after its last
    backward), keeps a parameter that two stages of one rank share (the embedding under DualPipeV
    with MTP) from being divided twice.
    """

    def __init__(self, num_microbatches: int) -> None:
        self.num_microbatches = num_microbatches

    def __call__(self, loss: torch.Tensor, _target) -> torch.Tensor:
        return loss / self.num_microbatches


def split_microbatches(
    batch: torch.Tensor | Batch, num_microbatches: int
) -> list[torch.Tensor] | list[Batch]:
    """The step's micro-batches: row blocks of plain windows, or ``Batch.split``'s (global counts kept)."""
    tokens = batch if isinstance(batch, torch.Tensor) else batch.tokens
    if tokens.shape[0] % num_microbatches:
        raise ValueError(
            f"the batch has {tokens.shape[0]} windows, not a multiple of {_KEY}.num_microbatches "
            f"({num_microbatches}); set data.batch_size to a multiple of {num_microbatches}"
        )
    return list(batch.chunk(num_microbatches)) if tokens is batch else batch.split(num_microbatches)


class PipelineRunner:
    def __init__(
        self,
        module: DSV3LightningModule,
        plan: SchedulePlan,
        group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
        overlap: OverlapHook | None = None,
    ) -> None:
        self.module, self.plan, self.layout = module, plan, plan.layout
        self.overlap = overlap
        """How our runtime runs its (F;B) pairs (overlap.py): ``dualpipe``'s, and ``dualpipev``'s, which
        then runs on our runtime instead of torch's; None: one after the other, dualpipev on torch's."""
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        if dist.get_world_size(self.group) != self.layout.num_ranks:
            raise ValueError(
                f"{_KEY}.pipeline_parallel_size ({self.layout.num_ranks}) must equal the number of processes "
                f"({dist.get_world_size(self.group)}): set trainer.devices x trainer.num_nodes to it"
            )
        self.device = device or next(module.parameters()).device
        self.pieces = build_pieces(
            module, self.layout.num_pieces, schedule=plan.schedule, ranks=self.layout.num_ranks
        )
        self.local_stages = self.layout.stages_of(self.rank)
        self.owners = self._owners()
        self.full_shapes = {n: t.shape for n, t in module.state_dict().items()}
        self.released: set[str] = set()
        """Parameters whose storage this rank gave back (``release_unowned``)."""
        self._schedule = None
        self._stages: list[_Stage] = []
        self._log_keys: list[str] | None = None
        self.eval_log_keys: dict[str, list[str]] = {}
        """The heads' evaluation log names by stage name ("val", "test"), once known (evaluation.py)."""
        self.pipeline_order: dict[int, list] = plan.actions

    # ------------------------------------------------------------------ ownership
    def _owners(self) -> dict[str, set[int]]:
        """Parameter and buffer name -> the pipeline ranks whose pieces use it."""
        owners: dict[str, set[int]] = {}
        for stage, rank in self.layout.stage_to_rank.items():
            piece = self.pieces[self.layout.piece(stage)]
            names = parameter_names(piece, self.module)
            ids = {id(b) for b in piece.buffers()}
            names |= {n for n, b in self.module.named_buffers() if id(b) in ids}
            for name in names:
                owners.setdefault(name, set()).add(rank)
        return owners

    def local_parameter_names(self) -> set[str]:
        return {n for n, ranks in self.owners.items() if self.rank in ranks}

    @property
    def last_pieces_here(self) -> bool:
        return any(self.layout.is_last(s) for s in self.local_stages)

    # ------------------------------------------------------------------ schedule
    def _build(self, tokens_mb: torch.Tensor) -> None:
        kind = plan_spec(self.plan)
        if kind.runtime == "ours" or (kind.pairs and self.overlap is not None):
            b, s = tokens_mb.shape[0], tokens_mb.shape[1] - 1 - self.module.extra_tokens
            dtype = self.module.model.model.embed_tokens.weight.dtype
            hidden = (b, s, self.module.config.hidden_size)
            self._schedule = BidirectionalRuntime(
                self.plan, self.pieces, self.rank, self.group, hidden, dtype, self.device
            )
            if self.overlap is not None:
                self._schedule.overlap = self.overlap
            return
        stages = [
            _Stage(self.pieces[self.layout.piece(s)], s, self.layout.num_stages, self.device, group=self.group)
            for s in self.local_stages
        ]
        m = self.plan.num_microbatches
        if kind.lists == "torch":
            schedule = kind.torch_class(stages, m, loss_fn=_ScaledLoss(m), scale_grads=False)
        else:  # our own action lists (1f1b, or a subclass's plan) on torch's action-list runtime
            schedule = ActionListRuntime(stages, m, loss_fn=_ScaledLoss(m), scale_grads=False)
            schedule.pipeline_order = dict(self.plan.actions)
            schedule._prepare_schedule_with_comms(schedule.pipeline_order)
        self.pipeline_order = compute_only(schedule.pipeline_order)
        self._schedule, self._stages = schedule, stages

    def run_schedule(self, batch: torch.Tensor | Batch) -> dict[int, torch.Tensor]:
        """Forward and backward of all micro-batches of ``batch`` (windows [B, S+1+extra], or a
        conversation batch read with its global counts); local losses by micro-batch index."""
        mbs = split_microbatches(batch, self.plan.num_microbatches)
        tokens = batch if isinstance(batch, torch.Tensor) else batch.tokens
        for piece in self.pieces:
            piece.logs.clear()
        if self._schedule is None:
            self._build(tokens.chunk(self.plan.num_microbatches)[0])
        if isinstance(self._schedule, BidirectionalRuntime):
            return self._schedule.step(mbs)
        for stage in self._stages:
            stage.microbatches = mbs  # what each stage runs (_Stage); torch splits ``tokens`` alike
        try:
            self._schedule.step(
                tokens, tokens=tokens, target=tokens, return_outputs=False
            )  # target: unused, required
        finally:
            for stage in self._stages:
                stage.microbatches = []
        last = [self.pieces[self.layout.piece(s)] for s in self.local_stages if self.layout.is_last(s)]
        for piece in last:  # at its first step torch runs one more forward per stage to infer shapes: drop it
            del piece.logs[: len(piece.logs) - self.plan.num_microbatches]
        return {
            i: log["loss"] for piece in last for i, log in enumerate(piece.logs)
        }  # torch runs F in mb order

    def sync_gradients(self) -> None:
        """Sums over the pipeline ranks the gradients of parameters used on more than one rank."""
        shared = [(n, p) for n, p in self.module.named_parameters() if len(self.owners.get(n, ())) > 1]
        if not shared:
            return
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else p.new_zeros(self.full_shapes[n])).reshape(-1)
                for n, p in shared
            ]
        )
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for name, p in shared:
            n = self.full_shapes[name].numel()
            if self.rank in self.owners[name]:
                p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def train_step(self, batch: torch.Tensor | Batch) -> tuple[dict[str, torch.Tensor], int]:
        """Runs the schedule; returns this rank's log sums and how many micro-batches they cover.

        The sums are the last pieces' micro-batch logs (``loss`` without the loss terms, ``ce``, the
        heads' logs), zeros where this rank holds no last piece (count 0), and the loss terms' values
        of this rank's layers over all micro-batches; every rank returns the same keys, on the runner's
        device, so that ``DSV3LightningModule.log_train`` reduces them over all processes in one
        all-reduce. The terms' gradients are weighed 1/M like the loss's (``router_losses.scale``).
        """
        losses = self.module.router_losses
        losses.scale = 1.0 / self.plan.num_microbatches
        try:
            self.run_schedule(batch)
        finally:
            losses.scale = 1.0
        self.sync_gradients()
        logs = [log for piece in self.pieces for log in piece.logs]
        keys = self._log_keys or self._train_log_keys(logs)
        total = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        for log in logs:
            total += torch.stack([log[k].detach().to(self.device, torch.float64).reshape(()) for k in keys])
        return {**dict(zip(keys, total)), **losses.pop(self.device)}, len(logs)

    def log_names(self, stage: str) -> list[str] | None:
        """The heads' log names at ``stage`` (fixed, from ``PredictionHead.log_names``), or None if a
        head does not say."""
        names = [head.log_names(stage) for head in self.module.heads]
        return None if any(n is None for n in names) else [k for n in names for k in n]

    def _train_log_keys(self, logs: list[dict[str, torch.Tensor]]) -> list[str]:
        heads = self.log_names("train")
        if heads is not None:
            self._log_keys = ["loss", "ce", *heads]
            return self._log_keys
        # a head that does not name its logs: learn them from the last stages, once per run
        gathered: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, sorted({k for log in logs for k in log}), group=self.group)
        self._log_keys = sorted({k for ks in gathered for k in ks})
        return self._log_keys

    # ------------------------------------------------------------------ memory and checkpoints
    def release_unowned(self) -> int:
        """Gives back the storage of the parameters no piece of this rank uses (an empty tensor keeps
        each Parameter object, so the optimizer's references stay valid, and its number of dimensions,
        zero rows of the same shape, so that ``configure_optimizers`` puts it in the same weight-decay
        group on every rank); returns the elements kept."""
        for name, p in self.module.named_parameters():
            if self.rank not in self.owners.get(name, ()):
                p.data = p.data.new_empty((0, *p.shape[1:]))
                self.released.add(name)
        return sum(p.numel() for p in self.module.parameters())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer broadcast from its owning rank (the lowest that uses it); released
        parameters arrive in new tensors (the module stays as it is)."""
        state = self.module.state_dict()
        for name, tensor in state.items():
            ranks = self.owners.get(name)
            if name in self.released:
                tensor = state[name] = tensor.new_empty(self.full_shapes[name])
            if ranks:
                src = dist.get_global_rank(self.group, min(ranks))
                dist.broadcast(tensor, src, group=self.group)
        return state

    def restore_unowned(self) -> None:
        """Fills the released parameters again with the owners' current values (all ranks call it)."""
        state = self.full_state_dict()
        for name, p in self.module.named_parameters():
            if name in self.released:
                p.data = state[name]
        self.released.clear()
