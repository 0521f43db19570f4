"""The bias update all-reduces its counts: 2 gloo processes (DDP) = 1 process on the same global batch."""

from __future__ import annotations

import lightning as L
import torch
from dsv3_lightning.plugins.load_balancing import AuxLossFreeBalancing, update_bias
from test_balancing import make_module, routed_counts
from torch.utils.data import DataLoader


def biases_after_one_step(windows: torch.Tensor, *, devices: int, batch_size: int) -> torch.Tensor:
    module = make_module()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[AuxLossFreeBalancing(0.01)],
    )
    trainer.fit(module, DataLoader(list(windows), batch_size=batch_size))
    return torch.stack([r.e_score_correction_bias for r in module.model.routers()])


def test_two_processes_match_one_process_on_the_same_global_batch():
    windows = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(3))
    single = biases_after_one_step(windows, devices=1, batch_size=4)
    distributed = biases_after_one_step(windows, devices=2, batch_size=2)  # rank r gets windows r, r + 2
    torch.testing.assert_close(distributed, single, rtol=0, atol=0)
    torch.testing.assert_close(single, update_bias(routed_counts(make_module(), [windows]), 0.01))
    # Rank 0's own half alone would have moved the biases differently: the all-reduce matters.
    rank0_only = update_bias(routed_counts(make_module(), [windows[0::2]]), 0.01)
    assert not torch.equal(rank0_only, single)
