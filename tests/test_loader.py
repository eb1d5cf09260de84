"""The training loader: `data.loader_workers: auto` and how its resolved count reaches the plan and the stream."""

from __future__ import annotations

import gc
import itertools
import pickle
from pathlib import Path

import pytest
import torch

from trainer import config
from trainer.config import DataConfig
from trainer.data.formats import TextBatch, read_index
from trainer.data.stream import _ByValue, _RunLoader, _small_by_value, _tensors, epoch_plan, train_batches
from trainer.data.writer import write_shards
from trainer.errors import ConfigError


def run_config(cpus: int, **data: object) -> config.Config:
    return config.Config.model_validate({"data": {"loader_workers": "auto", **data}, "dist": {"cpus_per_worker": cpus}})


@pytest.mark.parametrize(("cpus", "shards", "world", "expected"), [
    (1, 20, 1, 0),   # one CPU: read in the training process
    (2, 20, 1, 1),
    (4, 20, 2, 3),
    (16, 20, 1, 4),  # at most 4
    (8, 5, 2, 2),    # no more workers than shards per rank
    (8, 1, 2, 0),    # fewer shards than ranks: at least 0
])
def test_auto_rule(cpus: int, shards: int, world: int, expected: int) -> None:
    assert run_config(cpus).data.workers_for(shards, world) == expected


def test_auto_is_parsed_and_a_number_is_kept() -> None:
    assert config.load(None, ["data.loader_workers=auto"]).data.loader_workers == "auto"
    assert run_config(8).data.model_copy(update={"loader_workers": 2}).workers_for(20, 1) == 2
    with pytest.raises(ConfigError, match="loader_workers"):
        config.load(None, ["data.loader_workers=many"])


def test_auto_reaches_the_plan_and_the_stream(tmp_path: Path) -> None:
    write_shards("digits", "labeled", tmp_path, samples_per_shard=100)  # 18 shards
    data = run_config(3, train=str(tmp_path), test=None, batch_size=16).data
    for world in (1, 2):  # every rank plans from the same inputs: min(3 - 1, 18 // world, 4) = 2
        plan = epoch_plan(tmp_path, data, seed=0, epoch=0, world_size=world, index=read_index(tmp_path))
        assert plan.workers == 2
    batches = list(train_batches(tmp_path, data, seed=0, epoch=0, rank=0, world_size=2))
    assert {batch["worker"] for batch in batches} == {0, 1}
    explicit = list(train_batches(tmp_path, data.model_copy(update={"loader_workers": 2}), seed=0, epoch=0, rank=0,
                                  world_size=2))
    assert [b["keys"] for b in batches] == [b["keys"] for b in explicit]


# --- persistent loader workers ---------------------------------------------------------------------------------

def stream_epochs(directory: Path, data: DataConfig, persistent: bool, *, first: int = 0, count: int = 3,
                  skip: int = 0, stop_after: int | None = None) -> list[list[list[str]]]:
    """Keys of `count` epochs, each epoch's stream opened ahead while the previous one runs (as TrainLoop.run);
    the first epoch resumed `skip` batches in, and the consumer leaving each epoch after `stop_after` batches."""
    keys, upcoming = [], None
    for epoch in range(first, first + count):
        batches = upcoming or train_batches(directory, data, seed=5, epoch=epoch, rank=1, world_size=2,
                                            skip_batches=skip, persistent=persistent)
        upcoming = train_batches(directory, data, seed=5, epoch=epoch + 1, rank=1, world_size=2, start=True,
                                 persistent=persistent)
        keys.append([batch["keys"] for batch in itertools.islice(batches, stop_after)])
    return keys


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits vectors in shards of 70 (a short last shard), packed by 16: slots of unequal size."""
    directory = tmp_path_factory.mktemp("uneven")
    write_shards("digits", "labeled", directory, samples_per_shard=70, pack=16)
    return directory


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("balanced", [False, True])
def test_persistent_workers_give_the_per_epoch_batches(uneven: Path, workers: int, balanced: bool) -> None:
    # P×K batches leave classes short of K unused, so every epoch also takes a top-up pass.
    settings = {"classes_per_batch": 4, "samples_per_class": 4} if balanced else {}
    data = DataConfig(train=str(uneven), test=None, batch_size=16, loader_workers=workers, **settings)
    assert stream_epochs(uneven, data, True) == stream_epochs(uneven, data, False)


def test_persistent_workers_resume_mid_epoch_and_follow_early_exits(uneven: Path) -> None:
    data = DataConfig(train=str(uneven), test=None, batch_size=16, loader_workers=2)
    whole = stream_epochs(uneven, data, False, first=1)
    resumed = stream_epochs(uneven, data, True, first=1, skip=7)
    assert resumed == [whole[0][7:], *whole[1:]]
    # A consumer leaving each epoch early (a run that stops): the next epoch still starts at its own beginning.
    assert stream_epochs(uneven, data, True, first=1, stop_after=3) == [epoch[:3] for epoch in whole]


def test_one_loader_serves_consecutive_epochs(uneven: Path) -> None:
    data = DataConfig(train=str(uneven), test=None, batch_size=16, loader_workers=2)
    current = train_batches(uneven, data, seed=5, epoch=0, rank=0, world_size=2)
    upcoming = train_batches(uneven, data, seed=5, epoch=1, rank=0, world_size=2, start=True)
    loaders = set(_RunLoader._live.values())
    assert len(loaders) == 1  # epoch 1 reuses epoch 0's loader (and its worker processes)
    assert next(current)["keys"] and next(upcoming)["keys"]  # epoch 0's rest is dropped, not served as epoch 1
    loader = loaders.pop()
    pids = {process.pid for process in loader.iterator._workers}
    again = train_batches(uneven, data, seed=5, epoch=2, rank=0, world_size=2, start=True)
    assert next(again)["keys"] and {process.pid for process in loader.iterator._workers} == pids
    del current, upcoming, again, loader
    gc.collect()
    assert not _RunLoader._live  # the last epoch stream gone: the loader and its workers stop


def test_small_tensors_cross_by_value_and_come_back_equal() -> None:
    batch = {"views": {"a": torch.arange(12, dtype=torch.float16).view(3, 4), "b": TextBatch(torch.arange(5),
                                                                                               torch.tensor([0, 2]))},
             "labels": {"a": torch.tensor([1, 2, 3])}, "similar": torch.tensor([True, False]), "keys": ["x", "y"],
             "big": torch.zeros(2**19, dtype=torch.float32), "corrupt": 0}
    sent = pickle.loads(pickle.dumps(_small_by_value(batch)))
    assert isinstance(sent["views"]["a"], _ByValue) and isinstance(sent["big"], torch.Tensor)  # 2 MiB: shared memory
    back = _tensors(sent)
    for got, want in [(back["views"]["a"], batch["views"]["a"]), (back["views"]["b"].ids, batch["views"]["b"].ids),
                      (back["views"]["b"].offsets, batch["views"]["b"].offsets), (back["similar"], batch["similar"]),
                      (back["labels"]["a"], batch["labels"]["a"]), (back["big"], batch["big"])]:
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert back["keys"] == ["x", "y"] and back["corrupt"] == 0
