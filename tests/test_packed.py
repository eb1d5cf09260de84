"""Packed shards (`twinscale shards --pack N`): the round trip, batches and evaluation identical to the same samples
written unpacked (vectors and texts, with and without DataLoader workers), exact mid-epoch resume, corrupt blocks
skipped and counted, images refused."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data.formats import TextBatch, ViewSpec, read_index
from trainer.data.packed import block_members
from trainer.data.sources import Item, encode_npy
from trainer.data.stream import eval_batches, train_batches
from trainer.data.writer import write_shards, write_tuples
from trainer.errors import DataError


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The digits vectors written unpacked and packed (blocks of 16 in shards of 50: a short last block)."""
    root = tmp_path_factory.mktemp("packed")
    for pack in (1, 16):
        write_shards("digits", "labeled", root / f"pack{pack}", test_fraction=0.4, samples_per_shard=50, pack=pack)
    return {pack: root / f"pack{pack}" for pack in (1, 16)}


def same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right) > 0
    for a, b in zip(left, right, strict=True):
        assert a["keys"] == b["keys"]
        for view in a["views"]:
            if isinstance(a["views"][view], TextBatch):
                assert torch.equal(a["views"][view].ids, b["views"][view].ids)
                assert torch.equal(a["views"][view].offsets, b["views"][view].offsets)
            else:
                assert torch.equal(a["views"][view], b["views"][view])
            assert torch.equal(a["content"][view], b["content"][view])
        assert a["labels"].keys() == b["labels"].keys()
        for view in a["labels"]:
            assert torch.equal(a["labels"][view], b["labels"][view])
        if "similar" in a:
            assert torch.equal(a["similar"], b["similar"])
        assert a["corrupt"] == b["corrupt"] == 0


def train(directory: Path, workers: int, *, epoch: int = 1, rank: int = 0, world_size: int = 2, skip: int = 0,
          **settings: object) -> list[dict]:
    cfg = DataConfig(train=str(directory), test=None, batch_size=16, loader_workers=workers, **settings)
    return list(train_batches(directory, cfg, seed=7, epoch=epoch, rank=rank, world_size=world_size,
                              skip_batches=skip))


def test_index_records_packing_and_counts_samples(digits: dict[int, Path]) -> None:
    plain, packed = read_index(digits[1] / "train"), read_index(digits[16] / "train")
    assert packed.pack == 16 and plain.pack == 1
    assert "pack" not in json.loads((digits[1] / "train" / "index.json").read_text())  # unpacked: unchanged
    assert [s.samples for s in packed.shards] == [s.samples for s in plain.shards]
    with tarfile.open(digits[16] / "train" / packed.shards[0].file) as tar:
        names = tar.getnames()
    assert len(names) == 4 * len(block_members(packed))  # 50 samples: blocks of 16, 16, 16 and 2
    assert "block-000003.keys.txt" in names and "block-000000.input.npy" in names


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_batches_equal_unpacked(digits: dict[int, Path], workers: int) -> None:
    for rank in (0, 1):
        same_batches(train(digits[1] / "train", workers, rank=rank), train(digits[16] / "train", workers, rank=rank))


def test_packed_class_balanced_batches_equal_unpacked(digits: dict[int, Path]) -> None:
    settings = {"classes_per_batch": 4, "samples_per_class": 4}
    same_batches(train(digits[1] / "train", 1, **settings), train(digits[16] / "train", 1, **settings))


def test_packed_resume_mid_epoch_is_exact(digits: dict[int, Path]) -> None:
    whole = train(digits[16] / "train", 1, world_size=1)
    same_batches(train(digits[16] / "train", 1, world_size=1, skip=5), whole[5:])


def test_packed_eval_equals_unpacked(digits: dict[int, Path]) -> None:
    for rank in (0, 1):
        batches = [list(eval_batches(digits[pack] / "test", DataConfig(test=None), batch_size=32, rank=rank,
                                     world_size=2)) for pack in (1, 16)]
        same_batches(*batches)


def text_pairs(count: int) -> list[tuple[str, tuple[Item, ...], bool]]:
    words = ["ünïcode", "", "a\nb", "tea", "coffee cup", "x" * 40]
    return [(f"p{n:04d}", (Item("txt", data=f"{words[n % 6]} {n}".encode()),
                           Item("txt", data=words[(n * 5) % 6].encode())), n % 3 == 0) for n in range(count)]


def test_packed_text_pairs_equal_unpacked(tmp_path: Path) -> None:
    for pack in (1, 8):
        write_tuples(tmp_path / f"pack{pack}", "pairs", text_pairs(90), ViewSpec("txt", None), labeled=False,
                     num_classes=None, samples_per_shard=30, pack=pack)
    for workers in (0, 1):
        same_batches(train(tmp_path / "pack1", workers, world_size=1), train(tmp_path / "pack8", workers, world_size=1))


def test_corrupt_block_is_skipped_and_counted(tmp_path: Path) -> None:
    write_tuples(tmp_path, "pairs", text_pairs(60), ViewSpec("txt", None), labeled=False, num_classes=None,
                 samples_per_shard=60, pack=10)
    shard = tmp_path / read_index(tmp_path).shards[0].file
    with tarfile.open(shard) as tar:  # rewrite block 2 with one text length too many: an inconsistent block
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            if info.name == "block-000002.a.len.npy":
                data = encode_npy(np.ones(11, np.int64))
                info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    cfg = DataConfig(train=str(tmp_path), test=None, batch_size=10, loader_workers=0, shuffle_buffer=0)
    batches = list(eval_batches(tmp_path, cfg, batch_size=10))
    keys = [key for batch in batches for key in batch["keys"]]
    assert len(keys) == 50 and "p0020" not in keys and "p0030" in keys and batches[-1]["corrupt"] == 1
    with pytest.raises(DataError, match="block-000002"):
        list(eval_batches(tmp_path, cfg.model_copy(update={"on_corrupt": "raise"}), batch_size=10))


def test_images_are_not_packed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="only npy and txt views are packed"):
        write_shards("digits", "labeled", tmp_path / "images", as_images=True, pack=8)
    assert not (tmp_path / "images").exists()


def test_cli_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch import cli

    assert cli.main(["shards", "digits", "--kind", "pairs", "--out", str(tmp_path / "pairs"), "--pack", "32"]) == 0
    assert read_index(tmp_path / "pairs").pack == 32
    assert cli.main(["shards", "digits", "--kind", "labeled", "--out", str(tmp_path / "png"), "--as-images",
                     "--pack", "32"]) == 2
    assert "only npy and txt views are packed" in capsys.readouterr().err
    assert not (tmp_path / "png").exists()
