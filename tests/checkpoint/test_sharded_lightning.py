"""The Lightning layout of a sharded checkpoint, against a real one: a tiny DeepSeek-V3 (MoE with 8
experts, MTP depth 1) trained 2 steps by Lightning into an ordinary ``last.ckpt``, then saved sharded by
2 gloo ranks as a strategy would (expert rows and their optimizer state split, the rest replicated).
The sharded directory must read back as the same Lightning dict, resume a single-process run to the
same weights, convert to the same Hugging Face files and open in ``load_trained``, without reading the
optimizer state where only the model is wanted."""

from __future__ import annotations

import filecmp
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from dsv3_lightning.plugins.mtp import MultiTokenPrediction
from ep_launch import run_ranks
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint import FileSystemReader
from torch.utils.data import DataLoader

from dsv3_lightning import preset
from dsv3_lightning.convert import convert
from dsv3_lightning.loading import load_trained
from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.sharded_checkpoint import Chunk, read_objects, save
from dsv3_lightning.sharded_checkpoint_io import (
    ShardedCheckpointIO,
    lightning_entries,
    optimizer_entries,
    optimizer_state_from_entries,
)
from dsv3_lightning.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
             num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=64)
E = SHAPE["n_routed_experts"]


def make_module() -> DSV3LightningModule:
    torch.manual_seed(0)
    return DSV3LightningModule(preset("tiny", **SHAPE), [MultiTokenPrediction(depth=1, loss_weight=0.3)],
                               warmup_steps=0, learning_rate=1e-3, min_lr_ratio=1.0)


def fit(root, max_steps: int, ckpt_path=None, plugins=()) -> DSV3LightningModule:
    module = make_module()
    windows = torch.randint(0, 64, (32, 10), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                        plugins=list(plugins), callbacks=[ModelCheckpoint(root, save_last=True)])
    trainer.fit(module, DataLoader(list(windows), batch_size=8), ckpt_path=ckpt_path, weights_only=False)
    return module


def is_expert(name: str) -> bool:
    return ".experts." in name and name.endswith(("gate_up_proj", "down_proj"))


def save_as_rank(rank: int, world: int, ckpt_path, path) -> None:
    """What an expert-parallel strategy's save does: this rank's expert rows as Chunks, the rest whole."""
    checkpoint = torch.load(ckpt_path, weights_only=False)
    module = DSV3LightningModule.from_hparams(checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    module._trainer = SimpleNamespace(estimated_stepping_batches=2)  # all configure_optimizers reads
    optimizer = module.configure_optimizers()["optimizer"]
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    rows = E // world

    def mine(name: str, value: torch.Tensor) -> Chunk | torch.Tensor:
        local = value[rank * rows : (rank + 1) * rows].clone()
        return Chunk.rows(local, E, rank * rows) if is_expert(name) else value

    def chunk_of(param, name, value):
        piece = mine(name, value)
        return piece.flattened() if isinstance(piece, Chunk) else piece.reshape(-1)

    names = {p: n for n, p in module.named_parameters()}
    state_dict = {name: mine(name, value) for name, value in checkpoint["state_dict"].items()}
    entries = optimizer_entries(0, optimizer, optimizer.state_dict(), names, chunk_of)
    save(path, lightning_entries({**checkpoint, "state_dict": state_dict}, [entries]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    fit(root, 2)
    ckpt = root / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    tokenizer = train_tokenizer(["def main():\n    return 0\n"], vocab_size=MIN_VOCAB_SIZE)
    checkpoint["DSV3DataModule"] = {"tokenizer_json": tokenizer.to_str(), "vocab_size": 64}
    torch.save(checkpoint, ckpt)
    sharded = root / "sharded.ckpt"
    results = run_ranks(2, save_as_rank, ckpt, sharded)
    assert all(status == "ok" for status, _ in results.values()) and len(results) == 2, results
    return ckpt, sharded


def assert_same(got, want, where="checkpoint"):
    if torch.is_tensor(want):
        assert torch.is_tensor(got) and got.shape == want.shape and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert set(got) == set(want), (where, set(got) ^ set(want))
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, (int, float, str, bool, type(None))):
        assert got == want, where
    else:  # hyper-parameter objects (the MTP head): compared by what they describe
        assert type(got) is type(want) and repr(got) == repr(want), where


def test_the_checkpoint_io_reads_the_ordinary_lightning_dict(checkpoints):
    ckpt, sharded = checkpoints
    want = torch.load(ckpt, weights_only=False)
    got = ShardedCheckpointIO().load_checkpoint(sharded, weights_only=False)
    assert_same(got, want)
    assert any(is_expert(k) for k in got["state_dict"]) and got["optimizer_states"][0]["state"]
    assert ShardedCheckpointIO().load_checkpoint(ckpt, weights_only=False).keys() == want.keys()  # a file
    with pytest.raises(Exception, match="Weights only load failed"):  # weights_only as for a file
        ShardedCheckpointIO().load_checkpoint(sharded, weights_only=True)


def test_a_single_process_run_resumes_from_a_sharded_checkpoint(checkpoints, tmp_path):
    ckpt, sharded = checkpoints
    from_file = fit(tmp_path / "file", 3, ckpt_path=ckpt)
    from_sharded = fit(tmp_path / "sharded", 3, ckpt_path=sharded, plugins=[ShardedCheckpointIO()])
    assert_same(from_sharded.state_dict(), from_file.state_dict())  # weights, after a step with the moments


def test_convert_of_a_sharded_directory_gives_the_same_hugging_face_files(checkpoints, tmp_path, monkeypatch):
    ckpt, sharded = checkpoints
    read = []
    real = FileSystemReader.read_data

    def spy(self, plan, planner):
        read.append({item.dest_index.fqn for item in plan.items})
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", spy)
    convert(str(ckpt), str(tmp_path / "from_file"), max_shard_size=20000)
    convert(str(sharded), str(tmp_path / "from_sharded"), max_shard_size=20000)
    files = sorted(p.name for p in (tmp_path / "from_file").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1 and "tokenizer.json" in files
    assert sorted(p.name for p in (tmp_path / "from_sharded").iterdir()) == files
    same = filecmp.cmpfiles(tmp_path / "from_file", tmp_path / "from_sharded", files, shallow=False)
    assert same[0] == files, same  # byte for byte
    # one key per read, never the optimizer's
    assert read and all(len(keys) == 1 for keys in read)
    assert not [k for keys in read for k in keys if not k.startswith("state_dict.")]


def test_load_trained_opens_a_sharded_directory_and_its_hyper_parameters_need_no_tensor(checkpoints):
    ckpt, sharded = checkpoints
    from_sharded, from_file = load_trained(sharded), load_trained(ckpt)
    assert_same(from_sharded.model.state_dict(), from_file.model.state_dict())
    assert len(from_sharded.heads) == 1 and from_sharded.tokenizer.to_str() == from_file.tokenizer.to_str()
    objects = read_objects(sharded)
    assert objects["hyper_parameters"]["config"].n_routed_experts == E and "state_dict" not in objects


def test_an_incomplete_sharded_directory_is_refused_by_convert_and_load_trained(checkpoints, tmp_path):
    import shutil

    _, sharded = checkpoints
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    (broken / ".metadata").unlink()
    with pytest.raises(ValueError, match=r"broken: not a complete checkpoint \(no \.metadata"):
        convert(str(broken), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_trained(broken)


def test_optimizer_entries_round_trip_with_non_tensor_state_and_name_the_bad_shapes():
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    state["state"][0]["note"] = "kept"  # a per-parameter value that is not a tensor
    names = {layer.weight: "weight", layer.bias: "bias"}
    tensors, objects = optimizer_entries(1, optimizer, state, names)
    assert sorted(tensors) == ["optimizer_states.1.state.bias.momentum_buffer",
                               "optimizer_states.1.state.weight.momentum_buffer"]
    assert tensors["optimizer_states.1.state.weight.momentum_buffer"].shape == (6,)  # flattened
    shapes = {"weight": layer.weight.shape, "bias": layer.bias.shape}
    assert_same(optimizer_state_from_entries(1, tensors, objects, shapes), state)
    bad = r"state\.weight\.momentum_buffer: 6 elements, but the parameter weight has shape \[2, 2\]"
    with pytest.raises(ValueError, match=bad):
        optimizer_state_from_entries(1, tensors, objects, {**shapes, "weight": torch.Size([2, 2])})
    with pytest.raises(NotImplementedError, match=r"optimizer state key 'a\.b' of bias holds a dot"):
        optimizer_entries(1, optimizer, {**state, "state": {1: {"a.b": torch.ones(2)}}}, names)
