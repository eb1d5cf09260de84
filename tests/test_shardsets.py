"""WebDataset shard sets written by other tools: patterns, field maps, counts from `twinscale scan`, resampling."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from launch.cli import main as twinscale
from tests.foreign_shards import CLASSES, write_img2dataset_shards, write_scanned_set
from trainer import config
from trainer.config import DataConfig
from trainer.data.formats import ViewSpec
from trainer.data.scan import count_samples
from trainer.data.shardsets import FieldMap, expand, open_shard_set, raw_members
from trainer.data.stream import _DeclaredMembers, eval_batches, train_batches
from trainer.engine.build import plan_run
from trainer.errors import ConfigError, DataError

TEXT_FIELDS = {"input": "txt", "label": "json.label"}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shards of 40 img2dataset-style samples, scanned (index.json next to them)."""
    return write_scanned_set(tmp_path_factory.mktemp("foreign"))


def data_config(root: Path, **settings: object) -> DataConfig:
    return DataConfig(train=f"{root}/{{00000..00003}}.tar", test=None, fields=TEXT_FIELDS, batch_size=16,
                      shuffle_buffer=32, **settings)  # type: ignore[arg-type]


def test_a_pattern_and_field_map_give_an_index_of_the_kind(foreign: Path) -> None:
    index = open_shard_set(f"{foreign}/{{00000..00003}}.tar", {"a": "jpg;png;webp", "b": "txt"})
    assert index.kind == "pairs" and not index.labels
    assert index.views == {"a": ViewSpec("jpg", None, ("png", "webp")), "b": ViewSpec("txt", None)}
    assert [s.samples for s in index.shards] == [40] * 4 and index.location == str(foreign)
    labeled = open_shard_set(f"{foreign}/*.tar", TEXT_FIELDS)  # a glob, counts from index.json next to them
    assert labeled.kind == "labeled" and labeled.labels and labeled.num_samples == 160


def test_only_mapped_members_are_read(foreign: Path) -> None:
    assert raw_members({"a": "jpg;png", "b": "txt", "label": "json.label"}) == {"jpg", "png", "txt", "json"}
    select = _DeclaredMembers(open_shard_set(f"{foreign}/*.tar", TEXT_FIELDS).members())
    assert [name for name in ("1.txt", "1.json", "1.jpg", "1.pth", "1.png") if select(name)] == ["1.txt", "1.json"]
    renamed = FieldMap({"a": "jpg;png", "b": "txt"}).rename({"__key__": "k", "png": b"P", "txt": b"T", "pth": b"X"})
    assert renamed == {"__key__": "k", "a.png": b"P", "b.txt": b"T", "similar": b"1"}
    labeled = FieldMap({"input": "txt", "label": "json.meta.label"}).rename(
        {"__key__": "k", "txt": b"T", "json": b'{"meta": {"label": 7}}'})
    assert labeled == {"__key__": "k", "input.txt": b"T", "cls": b"7"}
    missing = FieldMap(TEXT_FIELDS).rename({"__key__": "k", "txt": b"T", "json": b"{}"})
    assert "cls" not in missing  # the decoder then counts the sample as corrupt


def test_scan_counts_samples_from_headers(foreign: Path, tmp_path: Path) -> None:
    assert count_samples(str(foreign / "00000.tar")) == 40
    written = json.loads((foreign / "index.json").read_text())
    assert written["num_samples"] == 160 and written["shards"][0] == {"file": "00000.tar", "samples": 40}
    out = tmp_path / "counts.json"  # elsewhere: shards named by full path; a pool of 2 processes
    assert twinscale(["scan", f"{foreign}/{{00000..00003}}.tar", "--out", str(out), "--processes", "2"]) == 0
    assert json.loads(out.read_text())["shards"][3] == {"file": str(foreign / "00003.tar"), "samples": 40}


def test_train_and_eval_batches_of_a_foreign_set(foreign: Path) -> None:
    cfg = data_config(foreign)
    batches = list(train_batches(cfg.train, cfg, seed=1, epoch=0, rank=0, world_size=2))
    assert len(batches) == 80 // 16  # 2 shards of 40 per rank
    for batch in batches:  # labels come from the json member: key number modulo CLASSES
        assert batch["labels"]["input"].tolist() == [int(key) % CLASSES for key in batch["keys"]]
    evaluated = list(eval_batches(cfg.train, cfg, batch_size=50))
    keys = [key for batch in evaluated for key in batch["keys"]]
    assert keys == [f"{n:09d}" for n in range(160)] and evaluated[-1]["corrupt"] == 0
    again = list(train_batches(cfg.train, cfg, seed=1, epoch=0, rank=0, world_size=2, skip_batches=2))
    assert [b["keys"] for b in again] == [b["keys"] for b in batches[2:]]


def test_resampled_mode_needs_no_counts_and_resumes_exactly(tmp_path: Path) -> None:
    write_img2dataset_shards(tmp_path, shards=3, per_shard=20)
    cfg = data_config(tmp_path, epoch_samples=100, loader_workers=2).model_copy(
        update={"train": f"{tmp_path}/{{00000..00002}}.tar"})
    with pytest.raises(DataError, match="twinscale scan"):
        open_shard_set(cfg.train, TEXT_FIELDS)
    first = [b["keys"] for b in train_batches(cfg.train, cfg, seed=4, epoch=2, rank=1, world_size=2)]
    assert len(first) == 100 // (2 * 16)
    assert [b["keys"] for b in train_batches(cfg.train, cfg, seed=4, epoch=2, rank=1, world_size=2)] == first
    resumed = [b["keys"] for b in train_batches(cfg.train, cfg, seed=4, epoch=2, rank=1, world_size=2,
                                                 skip_batches=1)]
    assert resumed == first[1:]
    other_epoch = [b["keys"] for b in train_batches(cfg.train, cfg, seed=4, epoch=3, rank=1, world_size=2)]
    assert other_epoch != first


def test_bad_specs_name_what_is_wrong(foreign: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"4 of 4 shard\(s\) do not exist"):
        expand(f"{tmp_path}/{{00000..00003}}.tar")
    with pytest.raises(DataError, match="matches no file"):
        expand(f"{tmp_path}/*.tar")
    with pytest.raises(DataError, match="needs data.fields"):
        open_shard_set(f"{foreign}/{{00000..00003}}.tar")
    with pytest.raises(ConfigError, match="data.fields"):
        config.load(None, ["data.fields={input: jpg, colour: txt}"])
    with pytest.raises(ConfigError, match="data.fields.input"):
        config.load(None, ["data.fields={input: gif}"])
    assert twinscale(["scan", f"{tmp_path}/{{0..3}}.tar", "--out", str(tmp_path / "i.json")]) == 2
    assert not (tmp_path / "i.json").exists()


def test_truncated_foreign_shard_is_counted_not_fatal(foreign: Path, tmp_path: Path) -> None:
    for name in ("00000.tar", "00001.tar", "index.json"):
        (tmp_path / name).write_bytes((foreign / name).read_bytes())
    with tarfile.open(tmp_path / "00001.tar") as tar:  # cut inside the caption of the shard's 21st sample
        cut = tar.getmember("000000060.txt").offset_data + 3
    (tmp_path / "00001.tar").write_bytes((tmp_path / "00001.tar").read_bytes()[:cut])
    cfg = data_config(tmp_path).model_copy(update={"train": f"{tmp_path}/{{00000..00001}}.tar"})
    batches = list(eval_batches(cfg.train, cfg, batch_size=100))
    keys = [key for batch in batches for key in batch["keys"]]
    # Counted twice: the unreadable tar section, and sample 60 that it leaves without a caption.
    assert keys == [f"{n:09d}" for n in range(60)] and batches[-1]["corrupt"] == 2


def test_image_text_pairs_of_mixed_formats_train(foreign: Path) -> None:
    # Every third sample is a png under a field map that lists jpg first: each is decoded by its own extension.
    cfg = config.load(None, [f"data.train={foreign}/*.tar", "data.test=null", "data.fields={a: 'jpg;png', b: txt}",
                             "data.image.size=16", "data.batch_size=8", "model.architecture=pseudo_siamese",
                             "model.encoder=cnn", "model.encoder_b=text", "loss.name=infonce", "mining.name=none"])
    plan = plan_run(cfg, 1)
    assert plan.kind == "pairs" and plan.spec_a.shape == (3, 16, 16)
    batch = next(iter(train_batches(cfg.data.train, cfg.data, seed=0, epoch=0, rank=0, world_size=1,
                                    preprocessors=plan.preprocessors)))
    assert batch["views"]["a"].shape == (8, 3, 16, 16) and batch["similar"].tolist() == [1.0] * 8
    evaluated = list(eval_batches(cfg.data.train, cfg.data, batch_size=64, preprocessors=plan.preprocessors))
    assert sum(len(b["keys"]) for b in evaluated) == 160 and evaluated[-1]["corrupt"] == 0


def test_sources_mixed_by_weight_deterministically(tmp_path: Path) -> None:
    # Source a: 4 shards, keys < 10000; source b: 1 shard, keys ≥ 10000. Equal weights draw b half the time
    # (a union of the shards would give it a fifth).
    write_img2dataset_shards(tmp_path / "a", shards=4, per_shard=40)
    write_img2dataset_shards(tmp_path / "b", shards=1, per_shard=40, start=10_000)
    cfg = config.load(None, ["data.train=[{path: " + f"'{tmp_path}/a/*.tar', weight: 1}}, {{path: '{tmp_path}/b/*.tar'"
                             + ", weight: 1}]", "data.test=null", f"data.fields={TEXT_FIELDS}",
                             "data.epoch_samples=1280", "data.batch_size=16", "data.shuffle_buffer=32"]).data
    assert cfg.train_weights == (1.0, 1.0) and cfg.train == f"{tmp_path}/a/*.tar::{tmp_path}/b/*.tar"
    epochs = [[k for b in train_batches(cfg.train, cfg, seed=5, epoch=e, rank=0, world_size=1) for k in b["keys"]]
              for e in range(4)]
    from_b = sum(int(key) >= 10_000 for keys in epochs for key in keys) / sum(len(keys) for keys in epochs)
    assert all(len(keys) == 1280 for keys in epochs) and 0.35 < from_b < 0.65, from_b
    again = [k for b in train_batches(cfg.train, cfg, seed=5, epoch=2, rank=0, world_size=1, skip_batches=3)
             for k in b["keys"]]
    assert again == epochs[2][3 * 16:]
    with pytest.raises(ConfigError, match="data.epoch_samples"):
        config.load(None, ["data.train=[{path: a, weight: 2}, {path: b, weight: 1}]"])
    with pytest.raises(ConfigError, match="positive"):
        config.load(None, ["data.train=[{path: a, weight: 0}]", "data.epoch_samples=10"])


def test_twinscale_directories_mix_and_must_match(tmp_path: Path) -> None:
    from trainer.data.writer import write_shards

    write_shards("digits", "labeled", tmp_path / "v", test_fraction=0.4, seed=0, samples_per_shard=128)
    write_shards("digits", "labeled", tmp_path / "i", test_fraction=0.4, seed=0, samples_per_shard=128,
                 as_images=True)
    one, two = tmp_path / "v" / "train", tmp_path / "v" / "test"
    cfg = config.load(None, [f"data.train=[{{path: '{one}', weight: 3}}, {{path: '{two}', weight: 1}}]",
                             "data.test=null", "data.epoch_samples=512", "data.batch_size=64"]).data
    index = open_shard_set(cfg.train, None, None, 512, cfg.train_weights)
    assert index.num_samples == 1797 and index.shards[0].file == str(one / "shard-000000.tar")
    assert sum(s.weight for s in index.shards if s.file.startswith(str(one))) == pytest.approx(3.0)
    assert len(list(train_batches(cfg.train, cfg, seed=0, epoch=0, rank=0, world_size=2))) == 4
    with pytest.raises(DataError, match="mixed sources must match"):
        open_shard_set(f"{one}::{tmp_path / 'i' / 'train'}", None, None, 512, (1.0, 1.0))
