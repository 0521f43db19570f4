"""The non-finite guard (dsv3_lightning.guard): a NaN gradient stops the run before the optimizer
applies it, or skips the step exactly; no checkpoint of non-finite weights is ever written; on two
processes a NaN on one rank stops both at the same step (no hang)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "expert_parallel"))
from ep_tiny import fit, make_module  # noqa: E402

from dsv3_lightning.guard import NonFiniteError, NonFiniteGuard  # noqa: E402


class PoisonGradient(L.Callback):
    """Makes one gradient NaN after backward at the given optimizer steps (on the given ranks)."""

    def __init__(self, steps, ranks=(0,)) -> None:
        self.steps, self.ranks = set(steps), set(ranks)

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.steps and trainer.global_rank in self.ranks:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = float("nan")


class Snapshots(L.Callback):
    """The weights, selection biases and optimizer step counts at the start of every step."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        opt = trainer.optimizers[0]
        state["adam_steps"] = torch.tensor([float(s["step"]) for s in opt.state.values() if "step" in s] or [0.0])
        self.states[trainer.global_step] = state


def checkpoints(root: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)


def test_raise_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 2: the training loss is .*first non-finite gradient on rank 0: "
                       r"model\.model\.embed_tokens\.weight.*Stopped before the optimizer step .*"
                       r"model\.nonfinite\.action: skip"):
        fit(tmp_path, 1, 1, max_steps=4, callbacks=[PoisonGradient({2}), checkpoints(tmp_path)])
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2  # steps 0 and 1 done; step 2 was never applied nor saved
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


def test_skip_leaves_weights_moments_and_biases_untouched_and_counts(tmp_path):
    snaps = Snapshots()
    module = make_module(module_options={"nonfinite": NonFiniteGuard(action="skip")})
    fit(tmp_path, 1, 1, module=module, max_steps=5, callbacks=[PoisonGradient({2}), snaps, checkpoints(tmp_path)])
    before, after = snaps.states[2], snaps.states[3]
    for name in before:  # the skipped step changed nothing: weights, biases, Adam's step counts
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    changed = [n for n in snaps.states[4] if not torch.equal(snaps.states[4][n], after[n])]
    assert "model.model.layers.1.mlp.gate.e_score_correction_bias" in changed  # later steps train again
    assert module.nonfinite.skipped_steps == 1
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["nonfinite_guard"] == {"skipped_steps": 1, "consecutive_skips": 0}
    assert last["hyper_parameters"]["nonfinite"] == {"action": "skip", "max_consecutive_skips": 10}


def test_too_many_consecutive_skips_stop_the_run(tmp_path):
    module = make_module(module_options={"nonfinite": NonFiniteGuard(action="skip", max_consecutive_skips=2)})
    with pytest.raises(NonFiniteError, match=r"step 2: .*2 steps in a row were non-finite \(model\.nonfinite\."
                       r"max_consecutive_skips\)"):
        fit(tmp_path, 1, 1, module=module, max_steps=6, callbacks=[PoisonGradient({1, 2, 3})])


class PoisonWeight(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == 2:
            with torch.no_grad():
                pl_module.model.lm_head.weight[0, 0] = float("inf")


def test_a_checkpoint_of_nonfinite_weights_is_refused(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 2: refusing to write a checkpoint of a model with non-finite "
                       r"weights \(model\.lm_head\.weight on rank 0\); the previous checkpoint is kept"):
        fit(tmp_path, 1, 1, max_steps=4, callbacks=[PoisonWeight(), checkpoints(tmp_path)])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_bad_options():
    with pytest.raises(ValueError, match=r"model.nonfinite.action \('ignore'\) must be 'raise' or 'skip'"):
        NonFiniteGuard(action="ignore")
    with pytest.raises(ValueError, match=r"model.nonfinite.max_consecutive_skips \(0\) must be >= 1"):
        NonFiniteGuard(max_consecutive_skips=0)


class RankOneLate(NonFiniteGuard):
    """Rank 1 raises 3 s late, so that the launcher (which ends every process once one has failed,
    and reports that one) reports rank 0's error if rank 0 has one."""

    def check(self, module) -> None:
        try:
            super().check(module)
        except NonFiniteError:
            if module.global_rank == 1:
                time.sleep(3)
            raise


def test_a_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    # Rank 1's gradient only: rank 0's own gradients are finite, yet it must stop at step 1 too (a
    # rank that went on would wait in the next collective, and rank 1's late error would be reported).
    module = make_module(module_options={"nonfinite": RankOneLate()})
    with pytest.raises(Exception, match=r"(?s)Process 0 terminated .*NonFiniteError: step 1: the training loss is [0-9.]+\. "
                       r"Stopped before the optimizer step"):
        fit(tmp_path, 2, 2, module=module, max_steps=3, callbacks=[PoisonGradient({1}, ranks=(1,))])
