"""The stream: exactly-once sharding over ranks × DataLoader workers, seeded order, safe decoding, eval order.

Shards are built in tmp_path with WebDataset's TarWriter; each vector holds its own sample number, so a batch
can be checked against its keys. Two ranks are simulated by calling train_batches for rank 0 and rank 1.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from trainer.config import DataConfig
from trainer.data.formats import ShardIndex, ShardInfo, TextBatch, ViewSpec, read_index, write_index
from trainer.data.sources import encode_npy
from trainer.data.stream import eval_batches, plan_epoch, train_batches
from trainer.data.writer import write_shards
from trainer.errors import DataError

SIZES = [37, 50, 23, 41, 50, 19, 44, 30]  # 294 samples in shards that don't divide evenly
DIM = 4


def vector_sample(number: int) -> dict[str, bytes | str]:
    return {"__key__": f"s{number:05d}", "input.npy": encode_npy(np.full(DIM, number, np.float32)),
            "cls": str(number % 5).encode()}


def write_vector_shards(directory: Path, sizes: list[int], extra: dict[int, list[dict]] | None = None) -> list[str]:
    """Labeled vector shards of the given sizes (plus `extra[shard]` raw samples); returns keys in index order."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, keys, number = [], [], 0
    for position, size in enumerate(sizes):
        name = f"shard-{position:06d}.tar"
        samples = [vector_sample(number + i) for i in range(size)] + (extra or {}).get(position, [])
        number += size
        with wds.TarWriter(str(directory / name), encoder=False) as tar:
            for sample in samples:
                tar.write(sample)
        keys += [str(s["__key__"]) for s in samples]
        shards.append(ShardInfo(name, len(samples)))
    write_index(directory, ShardIndex(kind="labeled", views={"input": ViewSpec("npy", (DIM,))}, labels=True,
                                      num_classes=5, shards=tuple(shards), source="test"))
    return keys


def rank_keys(directory: Path, cfg: DataConfig, *, epoch: int, rank: int, world_size: int, seed: int = 0) -> list:
    batches = list(train_batches(directory, cfg, seed=seed, epoch=epoch, rank=rank, world_size=world_size))
    for batch in batches:
        numbers = [int(key[1:]) for key in batch["keys"]]
        assert batch["views"]["input"].shape == (cfg.batch_size, DIM)
        assert batch["views"]["input"][:, 0].tolist() == numbers  # each vector matches its key
        assert batch["labels"]["input"].tolist() == [n % 5 for n in numbers]
    return [batch["keys"] for batch in batches]


def test_exactly_once_across_two_ranks_and_two_workers(tmp_path: Path) -> None:
    all_keys = write_vector_shards(tmp_path, SIZES)
    cfg = DataConfig(batch_size=8, loader_workers=2, shuffle_buffer=64)
    plan = plan_epoch(read_index(tmp_path), seed=0, epoch=0, world_size=2, loader_workers=2, batch_size=8)
    per_rank = [rank_keys(tmp_path, cfg, epoch=0, rank=rank, world_size=2) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == plan.batches_per_rank > 0
    seen = [key for batches in per_rank for batch in batches for key in batch]
    assert len(seen) == len(set(seen))  # no sample twice, within or across ranks
    assert set(seen) <= set(all_keys)
    assert plan.dropped_samples == sum(SIZES) - 2 * 8 * plan.batches_per_rank > 0
    assert len(seen) == len(all_keys) - plan.dropped_samples


def test_plan_assigns_every_shard_once_with_equal_batches(tmp_path: Path) -> None:
    write_vector_shards(tmp_path, SIZES)
    index = read_index(tmp_path)
    plans = [plan_epoch(index, seed=3, epoch=epoch, world_size=2, loader_workers=2, batch_size=8)
             for epoch in range(4)]
    for plan in plans:
        assigned = [file for rank in plan.slots for slot in rank for file in slot]
        assert sorted(assigned) == sorted(s.file for s in index.shards)
        assert min(plan.rank_batches(r) for r in range(2)) == plan.batches_per_rank
    assert len({plan.order for plan in plans}) > 1  # the shard order changes with the epoch
    assert len({plan.batches_per_rank for plan in plans}) == 1  # ... but not the batch count
    again = plan_epoch(index, seed=3, epoch=2, world_size=2, loader_workers=2, batch_size=8)
    assert again == plans[2]


def test_order_depends_only_on_seed_and_epoch(tmp_path: Path) -> None:
    write_vector_shards(tmp_path, SIZES)
    cfg = DataConfig(batch_size=8, loader_workers=2, shuffle_buffer=64)
    first = rank_keys(tmp_path, cfg, epoch=0, rank=1, world_size=2)
    assert rank_keys(tmp_path, cfg, epoch=0, rank=1, world_size=2) == first
    assert rank_keys(tmp_path, cfg, epoch=1, rank=1, world_size=2) != first
    assert rank_keys(tmp_path, cfg, epoch=0, rank=1, world_size=2, seed=5) != first
    inline = DataConfig(batch_size=8, loader_workers=0, shuffle_buffer=64)
    assert rank_keys(tmp_path, inline, epoch=0, rank=0, world_size=1) == \
        rank_keys(tmp_path, inline, epoch=0, rank=0, world_size=1)


def test_skip_batches_resumes_mid_epoch(tmp_path: Path) -> None:
    write_vector_shards(tmp_path, SIZES)
    cfg = DataConfig(batch_size=8, loader_workers=2)
    full = [b["keys"] for b in train_batches(tmp_path, cfg, seed=0, epoch=0, rank=0, world_size=1)]
    resumed = [b["keys"] for b in train_batches(tmp_path, cfg, seed=0, epoch=0, rank=0, world_size=1,
                                                skip_batches=5)]
    assert resumed == full[5:]


def test_too_few_shards_for_the_world(tmp_path: Path) -> None:
    write_vector_shards(tmp_path, [40, 40, 40])
    index = read_index(tmp_path)
    with pytest.raises(DataError, match=r"2 rank\(s\) × 2 loader worker\(s\).*fewer data.loader_workers"):
        plan_epoch(index, seed=0, epoch=0, world_size=2, loader_workers=2, batch_size=48)  # 40 < 48 per slot
    with pytest.raises(DataError, match=r"rank 3's slots hold 0 sample"):
        plan_epoch(index, seed=0, epoch=0, world_size=4, loader_workers=0, batch_size=8)  # 3 shards, 4 ranks
    assert plan_epoch(index, seed=0, epoch=0, world_size=3, loader_workers=0, batch_size=8).batches_per_rank == 5
    with pytest.raises(DataError, match=str(tmp_path)):  # raised when called, before any batch is asked for
        train_batches(tmp_path, DataConfig(batch_size=8, loader_workers=1), seed=0, epoch=0, rank=0, world_size=4)


class CreatesFile:
    """Unpickling this creates a file: proof that nothing in the stream unpickles shard data."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def corrupt_samples(marker: Path) -> dict[str, dict[str, bytes | str]]:
    """One raw sample per kind of corruption, keyed by a name used in the tests."""
    pickled_npy = io.BytesIO()
    np.save(pickled_npy, np.array([CreatesFile(marker.with_suffix(".npy"))], dtype=object), allow_pickle=True)
    good = vector_sample(90_000)
    return {
        "bad_npy": {**vector_sample(90_001), "input.npy": b"\x93NUMPY garbage"},
        "pickled_npy": {**vector_sample(90_002), "input.npy": pickled_npy.getvalue()},
        "wrong_shape": {**vector_sample(90_003), "input.npy": encode_npy(np.zeros(DIM + 1, np.float32))},
        "bad_cls": {**vector_sample(90_004), "cls": b"seven"},
        "missing_member": {"__key__": "s90005", "cls": b"1"},
        "pyd": {**good, "extra.pyd": pickle.dumps(CreatesFile(marker)), "pkl": pickle.dumps(CreatesFile(marker))},
    }


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 700])


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    bad = corrupt_samples(marker)
    keys = write_vector_shards(tmp_path / "shards", [30, 30, 30], extra={1: list(bad.values())})
    truncate(tmp_path / "shards" / "shard-000002.tar")
    cfg = DataConfig(batch_size=8, loader_workers=0, on_corrupt="skip")
    batches = list(eval_batches(tmp_path / "shards", cfg, batch_size=8))
    seen = [key for batch in batches for key in batch["keys"]]
    assert "s90000" in seen  # the sample with undeclared .pyd/.pkl members is kept, those members ignored
    assert not {"s90001", "s90002", "s90003", "s90004", "s90005"} & set(seen)
    assert seen[:60] == [k for k in keys if k.startswith("s") and int(k[1:]) < 60]
    assert 60 < len(seen) < len(keys) - 5  # the truncated shard gave what it could, then the stream went on
    assert batches[-1]["corrupt"] >= 5 + 1  # five corrupt samples and at least one tar error
    assert not marker.exists() and not marker.with_suffix(".npy").exists()

    train = DataConfig(batch_size=8, loader_workers=2, on_corrupt="skip")
    batches = list(train_batches(tmp_path / "shards", train, seed=0, epoch=0, rank=0, world_size=1))
    plan = plan_epoch(read_index(tmp_path / "shards"), seed=0, epoch=0, world_size=1, loader_workers=2,
                      batch_size=8)
    assert len(batches) == plan.batches_per_rank  # topped up: corrupt samples never change the batch count
    worst = {}
    for batch in batches:
        worst[batch["worker"]] = max(worst.get(batch["worker"], 0), batch["corrupt"])
    assert sum(worst.values()) >= 1 and not marker.exists()


@pytest.mark.parametrize("name", ["bad_npy", "pickled_npy", "wrong_shape", "bad_cls", "missing_member"])
def test_corrupt_sample_raises_when_asked(tmp_path: Path, name: str) -> None:
    sample = corrupt_samples(tmp_path / "unpickled")[name]
    write_vector_shards(tmp_path / "shards", [20, 20], extra={0: [sample]})
    cfg = DataConfig(batch_size=4, loader_workers=0, on_corrupt="raise")
    with pytest.raises(DataError, match=rf"shard-000000.tar: sample {sample['__key__']}: .*on_corrupt=skip"):
        list(eval_batches(tmp_path / "shards", cfg, batch_size=4))
    workers = DataConfig(batch_size=4, loader_workers=1, on_corrupt="raise", shuffle_buffer=0)
    with pytest.raises(DataError, match=rf"^\S*shard-000000.tar: sample {sample['__key__']}"):
        list(train_batches(tmp_path / "shards", workers, seed=0, epoch=0, rank=0, world_size=1))
    assert not (tmp_path / "unpickled").exists()


def test_truncated_tar_raises_when_asked(tmp_path: Path) -> None:
    write_vector_shards(tmp_path, [20, 20])
    truncate(tmp_path / "shard-000001.tar")
    cfg = DataConfig(batch_size=4, loader_workers=0, on_corrupt="raise")
    with pytest.raises(DataError, match="shard-000001.tar: unreadable tar data"):
        list(eval_batches(tmp_path, cfg, batch_size=4))


def test_eval_yields_every_sample_once_in_order(tmp_path: Path) -> None:
    keys = write_vector_shards(tmp_path, SIZES)
    cfg = DataConfig(loader_workers=2, batch_size=64)
    batches = list(eval_batches(tmp_path, cfg, batch_size=50))
    assert [len(b["keys"]) for b in batches] == [50] * 5 + [44]  # last partial batch kept
    assert [key for b in batches for key in b["keys"]] == keys
    assert batches[0]["views"]["input"].dtype == torch.float32 and batches[0]["corrupt"] == 0


def test_image_pairs_and_text_triplets_batch_schema(tmp_path: Path) -> None:
    for label, color in enumerate(["red", "blue"]):
        folder = tmp_path / "imgs" / color
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (7, 5), color=(40 * i, 0, 255 if label else 0)).save(folder / f"{i}.png")
    write_shards(str(tmp_path / "imgs"), "pairs", tmp_path / "pairs", samples_per_shard=2, seed=1)
    batch = next(train_batches(tmp_path / "pairs", DataConfig(batch_size=2, loader_workers=0), seed=0, epoch=0,
                               rank=0, world_size=1))
    assert set(batch) == {"views", "labels", "content", "similar", "keys", "corrupt", "worker"}
    assert batch["views"]["a"].shape == (2, 3, 5, 7) and batch["views"]["a"].dtype == torch.float32
    assert 0.0 <= float(batch["views"]["b"].min()) and float(batch["views"]["b"].max()) <= 1.0
    assert batch["similar"].dtype == torch.float32 and batch["labels"]["b"].dtype == torch.int64
    assert batch["similar"].tolist() == (batch["labels"]["a"] == batch["labels"]["b"]).float().tolist()

    (tmp_path / "t.csv").write_text("anchor,positive,negative\n" + "".join(f"q{i},p{i},n{i}\n" for i in range(6)))
    write_shards(str(tmp_path / "t.csv"), "triplets", tmp_path / "text", samples_per_shard=3)
    cfg = DataConfig(batch_size=4, text_buckets=64, text_ngrams=(1, 2))
    batches = list(eval_batches(tmp_path / "text", cfg, batch_size=4))
    assert [len(b["keys"]) for b in batches] == [4, 2] and batches[0]["labels"] == {}
    anchor = batches[0]["views"]["anchor"]
    assert isinstance(anchor, TextBatch) and len(anchor) == 4 and int(anchor.ids.max()) < 64
    assert "similar" not in batches[0]
