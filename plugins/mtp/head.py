"""MultiTokenPrediction: D sequential MTP modules as a prediction head, with their loss.

Data: a window carries ``seq_len + 1 + D`` tokens (``extra_tokens = D``). With inputs t_0..t_{S-1}, the
main head predicts t_{i+1} at position i; depth k (1..D) predicts t_{i+k+1}, from the previous
depth's hidden state at i and the embedding of t_{i+k}:

    h_0 = the trunk's last hidden state (before the final norm)
    h_k = MTP_k(h_{k-1}, Emb(tokens[:, k : k+S]))      targets_k = tokens[:, k+1 : k+1+S]
    L_MTP = λ / D · Σ_k CE(logits_k, targets_k)

Fine-tuning on packed conversations: the depth-k modules attend inside each conversation as the trunk
does, and CE_k counts only target tokens of the predicting position's own conversation
(``Batch.target_mask(k + 1)``), so the main head and every depth learn from the same answers.

Logged as ``{stage}/mtp_loss`` and ``{stage}/mtp_loss/depth_k``, and at validation each depth's top-1
accuracy ``val/mtp_accuracy/depth_k``. The main head's ``val/loss`` is computed by the module without
MTP, as the paper evaluates. λ follows V3: ``loss_weight`` (0.3) until ``switch_at_step``, then
``later_loss_weight`` (0.1).

Checkpoints: the modules are submodules of the LightningModule (saved by Lightning). In the Hugging
Face layout they are layers ``num_hidden_layers + k - 1`` (``hf_state_dict`` / ``load_hf_state_dict``);
``attach`` reads them from the source directory (``model.hf_origin``, whose ``extra_keys`` list them)
when the model came from such a checkpoint; experts go through the core's one stacking adapter
(``dsv3_lightning.hf_experts``).
"""

from __future__ import annotations

import torch
from dsv3_lightning.plugins.mtp.module import MTPModule
from torch import nn

from dsv3_lightning.batch import Batch
from dsv3_lightning.heads import HeadOutput, PredictionHead
from dsv3_lightning.hf_experts import stack_state, unstack
from dsv3_lightning.model.transformer import DeepSeekV3

_KEY = "model.heads[MultiTokenPrediction]"
# the release repeats the embedding and output matrix in every MTP layer: the model's own serve
_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


class MultiTokenPrediction(PredictionHead):
    """D sequential multi-token-prediction modules sharing the model's embedding and output head.

    Args:
        depth: D, the number of extra tokens predicted (V3: 1).
        loss_weight: λ, the weight of the MTP loss (V3: 0.3 for the first 10T tokens).
        later_loss_weight: λ after ``switch_at_step`` (V3: 0.1); None keeps ``loss_weight``.
        switch_at_step: The optimizer step at which λ becomes ``later_loss_weight``.
    """

    def __init__(
        self,
        depth: int = 1,
        loss_weight: float = 0.3,
        *,
        later_loss_weight: float | None = None,
        switch_at_step: int | None = None,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"{_KEY}.depth ({depth}) must be >= 0 (0 disables MTP; V3 uses 1)")
        if loss_weight < 0 or (later_loss_weight is not None and later_loss_weight < 0):
            raise ValueError(f"{_KEY}.loss_weight ({loss_weight}, later {later_loss_weight}) must be >= 0")
        self.depth = depth
        self.extra_tokens = depth
        self.loss_weight = loss_weight
        self.later_loss_weight = later_loss_weight
        self.switch_at_step = switch_at_step
        self.layers = nn.ModuleList()

    def attach(self, model: DeepSeekV3) -> None:
        n = model.config.num_hidden_layers
        self.layers = nn.ModuleList(MTPModule(model.config, n + k) for k in range(self.depth))
        model.init_weights(self.layers)
        origin = model.hf_origin
        if origin is not None and origin.extra_keys:
            self.load_hf_state_dict(origin.read_extra(skip=lambda key: key.endswith(_COPIES)), n)

    def current_weight(self, step: int) -> float:
        """λ at optimizer ``step``: ``loss_weight``, then ``later_loss_weight`` from ``switch_at_step`` on."""
        if self.later_loss_weight is not None and self.switch_at_step is not None and step >= self.switch_at_step:
            return self.later_loss_weight
        return self.loss_weight

    def log_names(self, stage: str) -> list[str]:
        if self.depth == 0:
            return []
        names = [f"mtp_loss/depth_{k}" for k in range(1, self.depth + 1)] + ["mtp_loss"]
        if stage != "train":
            names += [f"mtp_accuracy/depth_{k}" for k in range(1, self.depth + 1)]
        return names

    def forward(self, hidden_states: torch.Tensor, batch: Batch, model: DeepSeekV3, *, stage: str,
                step: int = 0) -> HeadOutput:
        if self.depth == 0:
            return HeadOutput(hidden_states.new_zeros(()))
        S, tokens = hidden_states.shape[1], batch.tokens
        if tokens.shape[1] < S + 1 + self.depth:
            raise ValueError(
                f"windows of {tokens.shape[1]} tokens are too short for MTP depth {self.depth}: set "
                f"data.extra_tokens to {self.depth}"
            )
        cos, sin, mask = model.attention_inputs(S, hidden_states.device, batch.input_documents)
        h = hidden_states
        losses, logs = [], {}
        for k, layer in enumerate(self.layers, start=1):
            h = layer(h, model.embed(tokens[:, k : k + S]), cos, sin, mask)
            logits = model.lm_head(layer.shared_head.norm(h))
            ce = batch.cross_entropy(logits, offset=k + 1)
            losses.append(ce)
            logs[f"mtp_loss/depth_{k}"] = ce.detach()
            if stage != "train":
                correct = (logits.argmax(-1) == batch.targets(k + 1)).float()
                logs[f"mtp_accuracy/depth_{k}"] = batch.mean(correct, offset=k + 1)
        losses_D = torch.stack(losses)
        logs["mtp_loss"] = losses_D.mean().detach()
        return HeadOutput(self.weighted_loss(losses_D, step), logs)

    def weighted_loss(self, losses_D: torch.Tensor, step: int) -> torch.Tensor:
        """The extension point for another loss weighting: the MTP loss added to the training loss.

        ``losses_D`` [depth] holds each depth's cross-entropy (depth 1 first), ``step`` is the optimizer
        step. The default is V3's ``λ / D · Σ_k L_k`` with λ = ``current_weight(step)``. Only training
        adds it to the loss; ``mtp_loss`` (logged) stays the unweighted mean over depths.
        """
        return self.current_weight(step) * losses_D.mean()

    # ------------------------------------------------------------------ decoding
    @property
    def can_draft(self) -> bool:
        return self.depth > 0

    def speculative_generate(self, model: DeepSeekV3, input_ids: torch.Tensor, max_new_tokens: int, *,
                             on_token=None):
        from dsv3_lightning.plugins.mtp.speculative import speculative_generate

        return speculative_generate(model, self, input_ids, max_new_tokens, on_token=on_token)

    # ------------------------------------------------------------------ Hugging Face layout
    def hf_state_dict(self, model: DeepSeekV3) -> dict[str, torch.Tensor]:
        """The modules as ``model.layers.{N + k}.*`` (per-expert keys), with the release's copies of
        the shared embedding and output matrix (``embed_tokens``, ``shared_head.head``)."""
        n = model.config.num_hidden_layers
        out = {}
        for k, layer in enumerate(self.layers):
            prefix = f"model.layers.{n + k}."
            for key, tensor in unstack(layer.state_dict()):
                out[prefix + key] = tensor
            # copies (the release stores them per MTP layer; safetensors refuses shared storage)
            out[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
            out[prefix + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
        return out

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor], num_hidden_layers: int) -> None:
        for k, layer in enumerate(self.layers):
            prefix = f"model.layers.{num_hidden_layers + k}."
            own = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
            if not own:
                raise ValueError(
                    f"the checkpoint has no MTP module {k + 1} (keys {prefix}*): it was saved with "
                    f"num_nextn_predict_layers < {self.depth}; lower {_KEY}.depth or train the modules from scratch "
                    "by loading the checkpoint without them"
                )
            state = stack_state({key: t for key, t in own.items() if not key.endswith(_COPIES)})
            layer.load_state_dict(state, strict=True)
