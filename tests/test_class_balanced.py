"""P classes × K samples batches (data.classes_per_batch): shape, determinism, equal counts, memory cap, errors.

Real digits shards come from the shard writer; synthetic shards are written with WebDataset's TarWriter so
that each test controls which classes each shard holds. Each vector is [sample number, class id], so a batch
can be checked against its keys and labels.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from trainer import config
from trainer.config import DataConfig
from trainer.data.balance import ClassBalancer
from trainer.data.formats import ShardIndex, ShardInfo, ViewSpec, read_index, write_index
from trainer.data.sources import encode_npy
from trainer.data.stream import Batch, plan_epoch, train_batches
from trainer.data.writer import write_shards
from trainer.errors import ConfigError, DataError


def write_class_shards(directory: Path, shard_labels: list[list[int]], *, labels: bool = True) -> None:
    """Labeled 2-d vector shards, one tar per list of class ids."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, number = [], 0
    for position, classes in enumerate(shard_labels):
        name = f"shard-{position:06d}.tar"
        with wds.TarWriter(str(directory / name), encoder=False) as tar:
            for label in classes:
                tar.write({"__key__": f"s{number:05d}", "cls": str(label).encode(),
                           "input.npy": encode_npy(np.array([number, label], np.float32))})
                number += 1
        shards.append(ShardInfo(name, len(classes)))
    num_classes = len({label for classes in shard_labels for label in classes})
    write_index(directory, ShardIndex(kind="labeled", views={"input": ViewSpec("npy", (2,))}, labels=labels,
                                      num_classes=num_classes if labels else None, shards=tuple(shards)))


def mixed_shards(directory: Path, *, shards: int = 8, size: int = 40, classes: int = 6, skew: float = 0.0) -> None:
    """Shards whose samples are drawn from all classes; `skew` of them belong to class 0."""
    rng = np.random.default_rng(7)
    write_class_shards(directory, [[0 if rng.random() < skew else int(rng.integers(classes)) for _ in range(size)]
                                   for _ in range(shards)])


def assert_p_by_k(batch: Batch, classes: int, per_class: int) -> None:
    labels = batch["labels"]["input"].tolist()
    assert sorted(Counter(labels).values()) == [per_class] * classes  # P distinct classes, K samples each
    assert all(len(set(labels[i:i + per_class])) == 1 for i in range(0, len(labels), per_class))  # class-grouped
    assert len(set(batch["keys"])) == len(labels)
    vectors = batch["views"]["input"]
    if vectors.shape[1] == 2:  # synthetic: [number, class]
        assert vectors[:, 1].tolist() == labels and [f"s{int(n):05d}" for n in vectors[:, 0]] == batch["keys"]


def keys(directory: Path, cfg: DataConfig, *, epoch: int = 0, rank: int = 0, world_size: int = 1,
         seed: int = 0, skip: int = 0) -> list[list[str]]:
    batches = list(train_batches(directory, cfg, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                 skip_batches=skip))
    for batch in batches:
        assert_p_by_k(batch, cfg.classes_per_batch or 0, cfg.samples_per_class)
    return [batch["keys"] for batch in batches]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", "labeled", out / "labeled", samples_per_shard=150)
    write_shards("digits", "pairs", out / "pairs", samples_per_shard=300)
    return out


def test_real_digits_batches_are_p_classes_of_k_samples(digits: Path) -> None:
    cfg = DataConfig(batch_size=20, classes_per_batch=5, samples_per_class=4, loader_workers=2, shuffle_buffer=64)
    plan = plan_epoch(read_index(digits / "labeled"), seed=0, epoch=0, world_size=2, loader_workers=2, batch_size=20)
    for rank in (0, 1):
        batches = list(train_batches(digits / "labeled", cfg, seed=0, epoch=0, rank=rank, world_size=2))
        assert len(batches) == plan.batches_per_rank > 0
        for batch in batches:
            assert set(batch) == {"views", "labels", "content", "keys", "corrupt", "worker"}  # the plain batch schema
            assert batch["views"]["input"].shape == (20, 64)
            assert_p_by_k(batch, 5, 4)


def test_stream_depends_only_on_seed_epoch_rank(tmp_path: Path) -> None:
    mixed_shards(tmp_path)
    cfg = DataConfig(batch_size=9, classes_per_batch=3, samples_per_class=3, loader_workers=2, shuffle_buffer=16)
    first = keys(tmp_path, cfg, rank=1, world_size=2)
    assert keys(tmp_path, cfg, rank=1, world_size=2) == first
    assert keys(tmp_path, cfg, rank=1, world_size=2, epoch=1) != first
    assert keys(tmp_path, cfg, rank=1, world_size=2, seed=3) != first
    assert keys(tmp_path, cfg, rank=0, world_size=2) != first
    assert keys(tmp_path, cfg, rank=1, world_size=2, skip=len(first) - 2) == first[-2:]  # resumable mid-epoch


@pytest.mark.parametrize("world_size,workers", [(2, 0), (1, 2), (2, 2)])
def test_every_rank_yields_the_planned_count(tmp_path: Path, caplog: pytest.LogCaptureFixture, world_size: int,
                                             workers: int) -> None:
    mixed_shards(tmp_path, skew=0.5)  # half the samples are class 0, so one pass cannot fill the planned count
    cfg = DataConfig(batch_size=9, classes_per_batch=3, samples_per_class=3, loader_workers=workers,
                     shuffle_buffer=16)
    plan = plan_epoch(read_index(tmp_path), seed=0, epoch=0, world_size=world_size, loader_workers=workers,
                      batch_size=9)
    caplog.set_level(logging.INFO, logger="trainer.data.stream")
    per_rank = [keys(tmp_path, cfg, rank=rank, world_size=world_size) for rank in range(world_size)]
    assert [len(batches) for batches in per_rank] == [plan.batches_per_rank] * world_size
    top_ups = [r for r in caplog.records if "streaming the shards again" in r.getMessage()]
    assert top_ups  # the top-up path ran, and every rank still yielded exactly the planned count
    first_pass = top_ups[0].args[2]  # type: ignore[index]
    rank_batches = per_rank[0]
    later = rank_batches[first_pass:]
    assert later != rank_batches[:len(later)]  # a top-up pass is seeded anew, not a replay of the first batches


def test_class_buffer_caps_memory() -> None:
    rng = random.Random(0)
    stream = [rng.randrange(100) for _ in range(5000)]  # 100 classes: waiting for K of each needs ~300 samples
    capped: ClassBalancer[int] = ClassBalancer(4, 4, 64, random.Random(1))
    emitted = sum(len(capped.add(label, n) or []) for n, label in enumerate(stream))
    assert capped.peak <= 64
    assert capped.dropped > 0 and emitted + capped.dropped + capped.buffered == len(stream)
    assert emitted > 0.25 * len(stream)  # dropping the least-filled classes still forms batches
    unbounded: ClassBalancer[int] = ClassBalancer(4, 4, 10**6, random.Random(1))
    for n, label in enumerate(stream):
        unbounded.add(label, n)
    assert unbounded.peak > 64 and unbounded.dropped == 0  # without the cap the buffer grows past it


    def label(n: int) -> int:  # three samples in four are class 0
        return 0 if n % 4 else 1 + (n // 4) % 3

    skewed: ClassBalancer[int] = ClassBalancer(2, 2, 8, random.Random(1))
    kept = [m for n in range(200) for m in skewed.add(label(n), n) or []]
    held = {n for buffer in skewed.buffers.values() for n in buffer}
    dropped = set(range(200)) - set(kept) - held
    assert skewed.peak <= 8 and len(dropped) == skewed.dropped > 0
    assert {label(n) for n in dropped} == {0} and skewed.dropped_short == 0  # only the surplus of class 0 went


def test_class_buffer_setting_reaches_the_stream(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mixed_shards(tmp_path, shards=2, size=120, classes=20)
    caplog.set_level(logging.INFO, logger="trainer.data.balance")
    roomy = DataConfig(batch_size=4, classes_per_batch=2, samples_per_class=2, loader_workers=0)
    assert keys(tmp_path, roomy) and not [r for r in caplog.records if "data.class_buffer" in r.getMessage()]
    tight = roomy.model_copy(update={"class_buffer": 6})
    assert keys(tmp_path, tight)
    assert [r for r in caplog.records if "data.class_buffer=6" in r.getMessage()]


def test_shards_without_class_ids_are_rejected(digits: Path, tmp_path: Path) -> None:
    cfg = DataConfig(batch_size=4, classes_per_batch=2, samples_per_class=2, loader_workers=0)
    with pytest.raises(DataError, match=rf"{digits / 'pairs'}: data.classes_per_batch needs labeled.*pairs shards"):
        train_batches(digits / "pairs", cfg, seed=0, epoch=0, rank=0, world_size=1)  # raised before any batch
    write_class_shards(tmp_path / "unlabeled", [[0, 1] * 10], labels=False)
    with pytest.raises(DataError, match=r"unlabeled: data.classes_per_batch.*labeled shards without class ids"):
        train_batches(tmp_path / "unlabeled", cfg, seed=0, epoch=0, rank=0, world_size=1)
    write_class_shards(tmp_path / "two", [[0, 1] * 10])
    too_many = DataConfig(batch_size=6, classes_per_batch=3, samples_per_class=2, loader_workers=0)
    with pytest.raises(DataError, match=r"two: data.classes_per_batch=3 exceeds the 2 classes"):
        train_batches(tmp_path / "two", too_many, seed=0, epoch=0, rank=0, world_size=1)


def test_a_slot_that_can_never_form_a_batch_raises(tmp_path: Path) -> None:
    write_class_shards(tmp_path, [[label] * 20 for label in range(4)])  # one class per shard, one shard per slot
    cfg = DataConfig(batch_size=4, classes_per_batch=2, samples_per_class=2, loader_workers=2)
    with pytest.raises(DataError, match=r"no batch of 2 classes × 2 samples can be formed: only 1 of 1 class"):
        list(train_batches(tmp_path, cfg, seed=0, epoch=0, rank=0, world_size=2))


@pytest.mark.parametrize("overrides,expected", [
    (["data.classes_per_batch=4", "data.samples_per_class=4"], "data.batch_size: P×K batches hold"),
    (["data.classes_per_batch=4", "data.samples_per_class=4"], "set data.batch_size=16"),
    (["data.classes_per_batch=4", "data.samples_per_class=4", "data.batch_size=16", "data.class_buffer=8"],
     "data.class_buffer: 8 cannot hold one P×K batch of 16"),
    (["data.class_buffer=100"], "data.class_buffer: only P×K batches use it"),
    (["data.classes_per_batch=32", "data.samples_per_class=1", "data.batch_size=32"],
     "data.samples_per_class: Input should be greater than or equal to 2"),
    (["data.classes_per_batch=1"], "data.classes_per_batch: Input should be greater than or equal to 2"),
])
def test_config_errors_name_the_key(overrides: list[str], expected: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  batch_size: 64\n")
    with pytest.raises(ConfigError) as error:
        config.load(recipe, overrides)
    assert expected in str(error.value) and str(recipe) in str(error.value)
    ok = config.load(recipe, ["data.classes_per_batch=8", "data.samples_per_class=8"])
    assert (ok.data.classes_per_batch, ok.data.samples_per_class, ok.data.batch_size) == (8, 8, 64)
