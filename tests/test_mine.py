"""Index-mined hard negatives (`twinscale mine`): negatives of another class from the rank window (checked
against brute-force ranks), positives of the anchor's class, members copied byte for byte, shards that the
training stream reads, determinism with the seed, and bad input that exits 2 writing nothing."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import cli
from trainer import config, mine
from trainer.config import ModelConfig
from trainer.data.formats import read_index
from trainer.data.stream import train_batches
from trainer.data.writer import write_shards
from trainer.embed import embed_shards, load_model
from trainer.mine import MiningWindow, mine_hard_negatives, nearest_neighbours, select_triplets
from trainer.models.export import export_model
from trainer.models.towers import InputSpec, build_model

WINDOW = MiningWindow(skip_top=3, window=20, per_anchor=2, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported (untrained, seeded) MLP model in run/model and labeled digits vector shards."""
    root = tmp_path_factory.mktemp("mine")
    torch.manual_seed(0)
    spec, cfg = InputSpec("vector", (64,)), ModelConfig(encoder="mlp", hidden_dims=(32,), embedding_dim=16)
    export_model(build_model(cfg, spec).eval(), cfg, spec, None, root / "run" / "model")
    write_shards("digits", "labeled", root / "shards", samples_per_shard=256)
    return root


@pytest.fixture(scope="module")
def mined(corpus: Path) -> Path:
    mine_hard_negatives(corpus / "run", corpus / "shards", corpus / "hard", WINDOW, samples_per_shard=200)
    return corpus / "hard"


@pytest.fixture(scope="module")
def source(corpus: Path) -> tuple[torch.Tensor, np.ndarray, dict[bytes, int]]:
    """The source's embeddings and labels (rows in index order), and each input member's bytes → its row."""
    model, _, cfg = load_model(corpus / "run")
    embeddings, labels, keys = embed_shards(model, cfg, corpus / "shards", batch_size=256)
    members = read_members(corpus / "shards")
    assert [key for key, _ in members] == [key.rsplit("/", 1)[0] for key in keys]
    rows = {member["input.npy"]: row for row, (_, member) in enumerate(members)}
    assert len(rows) == len(keys)  # digits vectors are distinct, so bytes identify a sample
    return embeddings, np.asarray(labels), rows


def read_members(shard_dir: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {member suffix: raw bytes}) of every sample, in index order, read with tarfile alone."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in read_index(shard_dir).shards:
        with tarfile.open(shard_dir / shard.file) as tar:
            for info in tar:
                key, _, suffix = info.name.partition(".")
                handle = tar.extractfile(info)
                assert handle is not None
                samples.setdefault(key, {})[suffix] = handle.read()
    return list(samples.items())


def brute_force_ranks(embeddings: torch.Tensor, anchor: int, other: int) -> tuple[int, int]:
    """The lowest and highest rank `other` can take among the anchor's neighbours (itself excluded; ties)."""
    similarity = embeddings @ embeddings[anchor]
    similarity[anchor] = -torch.inf
    target = similarity[other]
    return int((similarity > target + 1e-6).sum()), int((similarity >= target - 1e-6).sum()) - 1


def test_negatives_come_from_the_rank_window_and_differ_in_class(mined: Path, source) -> None:
    embeddings, labels, rows = source
    triplets = read_members(mined)
    assert len(triplets) == json.loads((mined / mine.MINING_FILE).read_text())["triplets"] > 0
    for _, members in triplets:
        anchor, positive, negative = (rows[members[f"{view}.npy"]] for view in ("anchor", "positive", "negative"))
        assert labels[anchor] == labels[positive] != labels[negative] and anchor != positive
        for view, row in (("anchor", anchor), ("positive", positive), ("negative", negative)):
            assert int(members[f"{view}.cls"]) == labels[row]
        low, high = brute_force_ranks(embeddings, anchor, negative)
        assert low <= WINDOW.skip_top + WINDOW.window - 1 and high >= WINDOW.skip_top, (anchor, negative, low, high)


def test_stats_and_index_describe_the_output(mined: Path, corpus: Path) -> None:
    stats = json.loads((mined / mine.MINING_FILE).read_text())
    index = read_index(mined)
    assert index.kind == "triplets" and index.labels and index.num_classes == 10
    assert index.views["negative"].ext == "npy" and index.views["negative"].shape == (64,)
    assert index.num_samples == stats["triplets"] and [s.samples for s in index.shards][:1] == [200]
    assert stats["anchors"] == 1797 and stats["anchors_without_positive"] == 0
    full = stats["anchors"] - stats["anchors_without_negative"] - stats["anchors_with_fewer_negatives"]
    assert full * WINDOW.per_anchor + stats["anchors_with_fewer_negatives"] == stats["triplets"]
    assert (stats["skip_top"], stats["window"], stats["seed"]) == (3, 20, 7)


def test_mined_shards_feed_the_training_stream(mined: Path) -> None:
    cfg = config.load(None).data.model_copy(update={"batch_size": 32, "loader_workers": 0})
    batches = list(train_batches(mined, cfg, seed=0, epoch=0, rank=0, world_size=1))
    assert batches
    for batch in batches:
        assert set(batch["views"]) == {"anchor", "positive", "negative"}
        assert batch["views"]["negative"].shape == (32, 64)
        assert (batch["labels"]["anchor"] == batch["labels"]["positive"]).all()
        assert (batch["labels"]["anchor"] != batch["labels"]["negative"]).all()


def test_same_seed_gives_identical_shards(mined: Path, corpus: Path, tmp_path: Path) -> None:
    mine_hard_negatives(corpus / "run", corpus / "shards", tmp_path / "again", WINDOW, samples_per_shard=200)
    other = MiningWindow(WINDOW.skip_top, WINDOW.window, WINDOW.per_anchor, seed=8)
    mine_hard_negatives(corpus / "run", corpus / "shards", tmp_path / "other", other, samples_per_shard=200)
    first = (mined / "shard-000000.tar").read_bytes()
    assert (tmp_path / "again" / "shard-000000.tar").read_bytes() == first
    assert (tmp_path / "other" / "shard-000000.tar").read_bytes() != first


def test_batched_search_equals_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    embeddings = torch.nn.functional.normalize(torch.randn(300, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    monkeypatch.setattr(mine, "SEARCH_BUDGET", 7 * 11)  # 7 queries per search call
    starts, neighbours = zip(*nearest_neighbours(embeddings, k=10), strict=True)
    assert starts[:3] == (0, 7, 14)
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-torch.inf)
    expected = similarity.topk(10, dim=1).indices.numpy()
    np.testing.assert_array_equal(np.concatenate(neighbours), expected)


def test_single_item_classes_are_skipped_and_counted() -> None:
    embeddings = torch.nn.functional.normalize(torch.randn(40, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    labels = np.array([0] * 20 + [1] * 19 + [2])
    triplets, stats = select_triplets(embeddings, labels, MiningWindow(skip_top=0, window=39, per_anchor=1, seed=0))
    assert stats.anchors_without_positive == 1 and 39 not in triplets[:, 0]
    assert stats.triplets == len(triplets) == 39  # every other anchor finds another class among all 39 neighbours
    assert (labels[triplets[:, 0]] == labels[triplets[:, 1]]).all() and (triplets[:, 0] != triplets[:, 1]).all()
    assert (labels[triplets[:, 0]] != labels[triplets[:, 2]]).all()


def test_cli_mines_end_to_end(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hard"
    args = ["mine", str(corpus / "run" / "model"), str(corpus / "shards"), "--out", str(out), "--skip-top", "1",
            "--window", "5", "--seed", "3"]
    assert cli.main(args) == 0
    stats = json.loads((out / mine.MINING_FILE).read_text())
    line = capsys.readouterr().out
    assert f"mined {stats['triplets']} triplets from 1797 anchors" in line and str(out) in line
    assert f"{stats['anchors_without_negative']} without a negative in ranks [1, 6)" in line
    assert read_index(out).num_samples == stats["triplets"]
    assert cli.main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("change,message", [
    ({"model": "nowhere"}, "nowhere/config.json: not found"),
    ({"shards": "hard"}, "holds triplets shards; mining needs labeled shards"),
    ({"shards": "missing"}, "missing/index.json: shard index not found"),
    ({"flags": ["--window", "0"]}, "--window 0: must be ≥ 1"),
    ({"flags": ["--skip-top", "-1"]}, "--skip-top -1: must be ≥ 0"),
    ({"flags": ["--per-anchor", "0"]}, "--per-anchor 0: must be ≥ 1"),
    ({"out": "hard"}, "already exists and is not empty; remove it or pass --overwrite"),
    ({"out": "shards"}, "must differ from SHARDS"),
])
def test_bad_input_exits_2_and_writes_nothing(change: dict, message: str, corpus: Path, mined: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(path.name for path in corpus.rglob("*"))
    out = corpus / change.get("out", "never")
    args = ["mine", str(corpus / change.get("model", "run")), str(corpus / change.get("shards", "shards")),
            "--out", str(out), *change.get("flags", [])]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert sorted(path.name for path in corpus.rglob("*")) == before
