"""The training loader: `data.loader_workers: auto` and how its resolved count reaches the plan and the stream."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import config
from trainer.config import DataConfig
from trainer.data.formats import read_index
from trainer.data.stream import epoch_plan, train_batches
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
