"""The sharded-checkpoint engine: round trips on 1, 2 and 4 gloo processes with resharding, bytes per
rank, saves killed at the worst moments, and every error a bad checkpoint or template gets."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time

import pytest
import torch
from ep_launch import run_ranks

from dsv3_lightning.sharded_checkpoint import Chunk, is_sharded_checkpoint, load, read_objects, save
from dsv3_lightning.sharded_checkpoint_io import iter_full_tensors

E, FLAT = 8, 10007
SAVE_BOUNDS = {4: [0, 2000, 2001, 6500, FLAT], 2: [0, 5003, FLAT]}  # ZeRO-1 ranges, uneven
LOAD_BOUNDS = {2: [0, 3000, FLAT], 1: [0, FLAT]}  # other boundaries than the saver's
TENSORS = ("state_dict.", "optimizer_states.")


def full_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "state_dict.experts": torch.randn(E, 64, 64, generator=g),  # 128 KiB, rows split over the ranks
        "state_dict.norm": torch.randn(1024, generator=g),  # 4 KiB, replicated
        "optimizer_states.0.state.flat.exp_avg": torch.randn(FLAT, generator=g),  # 39 KiB, ZeRO-1 ranges
    }


def rank_state(rank: int, world: int, bounds: list[int], full: dict[str, torch.Tensor]) -> dict:
    rows, (lo, hi) = E // world, bounds[rank : rank + 2]
    experts, norm, flat = full.values()
    return {
        "state_dict.experts": Chunk.rows(experts[rank * rows : (rank + 1) * rows].clone(), E, rank * rows),
        "state_dict.norm": norm.clone(),
        "optimizer_states.0.state.flat.exp_avg": Chunk(flat[lo:hi].clone(), (FLAT,), (lo,)),
        "global_step": 7,
        "hyper_parameters": {"config": {"n_routed_experts": E}},
    }


def save_rank(rank: int, world: int, path) -> None:
    save(path, rank_state(rank, world, SAVE_BOUNDS[world], full_state()))


def load_rank(rank: int, world: int, path, bounds: list[int]) -> tuple[dict, dict]:
    empty = {k: torch.full_like(v, float("nan")) for k, v in full_state().items()}
    templates = {k: v for k, v in rank_state(rank, world, bounds, empty).items() if k.startswith(TENSORS)}
    objects = load(path, templates)
    return {k: v.local if isinstance(v, Chunk) else v for k, v in templates.items()}, objects


def expected(rank: int, world: int, bounds: list[int]) -> dict[str, torch.Tensor]:
    state = rank_state(rank, world, bounds, full_state())
    return {k: v.local if isinstance(v, Chunk) else v for k, v in state.items() if k.startswith(TENSORS)}


def ok(results: dict, world: int) -> list:
    assert sorted(results) == list(range(world)), results
    errors = {r: v for r, (status, v) in results.items() if status != "ok"}
    assert not errors, errors
    return [results[r][1] for r in range(world)]


def test_single_process_round_trip_without_a_process_group(tmp_path):
    path = tmp_path / "last.ckpt"
    full = full_state()
    save(path, rank_state(0, 1, [0, FLAT], full))
    assert not torch.distributed.is_initialized()
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no partial or .old left
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "objects.pt"]
    got, objects = load_rank(0, 1, path, [0, FLAT])
    for key, want in expected(0, 1, [0, FLAT]).items():
        assert torch.equal(got[key], want), key
    assert objects == {"global_step": 7, "hyper_parameters": {"config": {"n_routed_experts": E}}}
    assert read_objects(path) == objects
    # a chunk at offsets the saver never used, and a plain tensor for a key saved as a chunk
    rows, flat = Chunk.rows(torch.zeros(3, 64, 64), E, 5), torch.zeros(FLAT)
    load(path, {"state_dict.experts": rows, "optimizer_states.0.state.flat.exp_avg": flat})
    assert torch.equal(rows.local, full["state_dict.experts"][5:])
    assert torch.equal(flat, full["optimizer_states.0.state.flat.exp_avg"])


def test_expert_rows_and_ranges_saved_by_four_ranks_load_on_two_and_on_one(tmp_path):
    path = tmp_path / "sharded"
    ok(run_ranks(4, save_rank, path), 4)
    assert is_sharded_checkpoint(path) and not (tmp_path / ".sharded.partial").exists()

    # bytes per rank: its expert rows and ZeRO-1 range, one rank also the replicated norm (4 KiB)
    sizes = [(path / f"__{r}_0.distcp").stat().st_size for r in range(4)]
    share = [4 * (2 * 64 * 64 + hi - lo) for lo, hi in zip(SAVE_BOUNDS[4], SAVE_BOUNDS[4][1:])]
    extra = [size - own for size, own in zip(sizes, share)]
    assert all(0 <= x < 4096 + 3 * 2048 for x in extra), (sizes, share)  # DCP's item overhead: ~1.5 KiB
    assert sum(x >= 4096 for x in extra) == 1, extra  # the replicated tensor is written once
    print(f"bytes per rank {sizes}, own share {share}")

    for r, (got, objects) in enumerate(ok(run_ranks(2, load_rank, path, LOAD_BOUNDS[2]), 2)):
        assert objects["global_step"] == 7
        for key, want in expected(r, 2, LOAD_BOUNDS[2]).items():
            assert torch.equal(got[key], want), (r, key)

    got, _ = load_rank(0, 1, path, LOAD_BOUNDS[1])  # this process, no process group
    full = full_state()
    assert all(torch.equal(got[k], full[k]) for k in full)
    streamed = dict(iter_full_tensors(path))
    assert streamed.keys() == full.keys() and all(torch.equal(streamed[k], full[k]) for k in full)


def load_wrong_on_rank_1(rank: int, world: int, path) -> None:
    templates = {"state_dict.norm": torch.zeros(1024 + rank)}
    load(path, templates)


def test_a_bad_template_on_one_rank_is_every_ranks_error(tmp_path):
    path = tmp_path / "sharded"
    ok(run_ranks(2, save_rank, path), 2)
    results = run_ranks(2, load_wrong_on_rank_1, path)
    assert sorted(results) == [0, 1] and all(status == "error" for status, _ in results.values()), results
    assert all("state_dict.norm: the checkpoint" in message and "the model [1025]" in message
               for _, message in results.values())


# ------------------------------------------------------------------------ killed saves
BIG = 8  # tensors of 4 MiB: 32 MiB to write, far longer than the parent takes to notice the partial dir


def save_big(path) -> None:
    big = {f"big{i}": torch.full((2**20,), i) for i in range(BIG)}
    save(path, {"w": torch.ones(4), "global_step": 2, **big})


def killed_after_first_rename(path) -> None:
    """The swap's first rename (PATH -> PATH.old) happens, then the process dies (DCP's own rename of
    .metadata.tmp passes)."""
    real = os.rename

    def rename_then_die(src, dst):
        real(src, dst)
        if str(dst).endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die  # in the forked child only
    save_big(path)


def previous(path) -> tuple[torch.Tensor, dict]:
    w = torch.full((4,), float("nan"))
    return w, load(path, {"w": w})


def test_a_save_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    path, partial = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    save(path, {"w": torch.zeros(4), "global_step": 1})
    child = multiprocessing.get_context("fork").Process(target=save_big, args=(path,))
    child.start()
    deadline = time.monotonic() + 20
    while not partial.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.0005)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL and partial.is_dir()
    assert not (partial / ".metadata").exists()  # killed mid-save, not after it
    w, objects = previous(path)
    assert torch.equal(w, torch.zeros(4)) and objects == {"global_step": 1}
    save(path, {"w": torch.ones(4), "global_step": 3})  # the next save clears the leftovers
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"] and previous(path)[1] == {"global_step": 3}


def test_a_save_killed_between_the_two_renames_falls_back_to_the_old_one(tmp_path, caplog):
    path = tmp_path / "last.ckpt"
    save(path, {"w": torch.zeros(4), "global_step": 1})
    child = multiprocessing.get_context("fork").Process(target=killed_after_first_rename, args=(path,))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path)) == [".last.ckpt.partial", "last.ckpt.old"]  # PATH missing
    assert is_sharded_checkpoint(path)
    with caplog.at_level(logging.WARNING):
        w, objects = previous(path)
    assert torch.equal(w, torch.zeros(4)) and objects == {"global_step": 1}
    assert "a save replacing it was interrupted" in caplog.text and "last.ckpt.old" in caplog.text
    save(path, {"w": torch.ones(4), "global_step": 3})
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    w, objects = previous(path)
    assert torch.equal(w, torch.ones(4)) and objects == {"global_step": 3}


# ------------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ck"
    save(path, {"state_dict.a": torch.arange(6.0).view(2, 3), "state_dict.b": torch.ones(4),
                "state_dict.c": torch.zeros(5), "hyper_parameters": {}})
    return path


def test_a_directory_without_metadata_is_not_a_complete_checkpoint(saved):
    (saved / ".metadata").unlink()
    with pytest.raises(ValueError, match=r"ck: not a complete checkpoint \(no \.metadata"):
        load(saved, {"state_dict.b": torch.zeros(4)})
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        list(iter_full_tensors(saved))


def test_a_missing_shard_file_is_named(saved):
    (saved / "__0_0.distcp").unlink()
    with pytest.raises(FileNotFoundError, match=r"ck/__0_0\.distcp: missing shard file"):
        load(saved, {"state_dict.b": torch.zeros(4)})


def test_a_key_the_checkpoint_lacks_is_named(saved):
    with pytest.raises(ValueError, match=r"state_dict\.d: not in the checkpoint .*another shape or config"):
        load(saved, {"state_dict.a": torch.zeros(2, 3), "state_dict.d": torch.zeros(1)})


def test_the_first_shape_mismatch_is_named_with_both_shapes(saved):
    a, b, c = torch.zeros(2, 3), torch.zeros(5), torch.zeros(6)  # b and c mismatch: b is named
    with pytest.raises(ValueError, match=r"state_dict\.b: the checkpoint .* shape \[4\], the model \[5\]"):
        load(saved, {"state_dict.a": a, "state_dict.b": b, "state_dict.c": c})
    with pytest.raises(ValueError, match=r"state_dict\.a: .* holds shape \[2, 3\], the model \[3, 3\]"):
        load(saved, {"state_dict.a": Chunk(torch.zeros(1, 3), (3, 3), (0, 0))})


def test_a_failed_save_leaves_the_previous_checkpoint(saved):
    with pytest.raises(ValueError, match=r"state_dict\.a: the ranks' chunks hold 3 of its 6 elements"):
        save(saved, {"state_dict.a": Chunk(torch.zeros(1, 3), (2, 3), (1, 0))})
    a = torch.zeros(2, 3)
    load(saved, {"state_dict.a": a})
    assert torch.equal(a, torch.arange(6.0).view(2, 3))


def test_chunks_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match=r"Chunk of shape \[3\] at offsets \[2\] does not fit in .* \[4\]"):
        Chunk(torch.zeros(3), (4,), (2,))
    with pytest.raises(ValueError, match="only a chunk of whole rows"):
        Chunk(torch.zeros(2, 2), (2, 4), (0, 2)).flattened()
    with pytest.raises(ValueError, match="flattened.. needs a contiguous local tensor"):
        Chunk.rows(torch.zeros(3, 4).t(), 8, 0).flattened()


def load_alone(rank: int, world: int, path) -> list[float]:
    w = torch.zeros(4)
    load(path, {"w": w}, no_dist=True)  # inside a 2-rank run, this process on its own
    return w.tolist()


def test_one_rank_of_a_distributed_run_loads_on_its_own(tmp_path):
    save(tmp_path / "ck", {"w": torch.arange(4.0)})
    results = run_ranks(2, load_alone, tmp_path / "ck")
    assert results == {r: ("ok", [0.0, 1.0, 2.0, 3.0]) for r in range(2)}, results
