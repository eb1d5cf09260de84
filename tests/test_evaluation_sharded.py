"""Evaluation shared by every worker: each rank embeds its share of the held-out split, the shares are gathered,
and each rank scores its share of the queries. 2 and 3 real gloo processes must return exactly the metrics of
one process, for labeled, pair (verification and retrieval both ways) and triplet shards, with fewer shards
than ranks and a rank with no sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from spawned import run_ranks

from trainer import config
from trainer.config import Config, DataConfig
from trainer.data.formats import ShardIndex, ShardInfo, ViewSpec, read_index, write_index
from trainer.data.sources import encode_npy
from trainer.data.stream import eval_batches, eval_share
from trainer.data.writer import write_shards
from trainer.engine.evaluate import evaluate
from trainer.objectives.gather import ProcessGroupCollective

DIM = 6


class RowWise(torch.nn.Module):
    """A tower whose output row depends on its input row alone (no matmul), so that embeddings are the same bit
    for bit whatever batch a sample lands in: then metrics of shares must equal one process's exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, DIM))

    def forward(self, inputs: torch.Tensor, side: str) -> torch.Tensor:
        rows = inputs.flatten(1) * self.scale
        return torch.nn.functional.normalize(rows if side == "a" else rows.flip(1), dim=1)


def write_labeled(directory: Path, sizes: list[int], seed: int) -> list[str]:
    """Labeled random vectors (continuous: no ties) in shards of `sizes`; returns the keys in index order."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    shards, keys = [], []
    for position, size in enumerate(sizes):
        name = f"shard-{position:06d}.tar"
        with wds.TarWriter(str(directory / name), encoder=False) as tar:
            for _ in range(size):
                key = f"s{len(keys):05d}"
                tar.write({"__key__": key, "input.npy": encode_npy(rng.standard_normal(DIM).astype(np.float32)),
                           "cls": str(int(rng.integers(0, 7))).encode()})
                keys.append(key)
        shards.append(ShardInfo(name, size))
    write_index(directory, ShardIndex(kind="labeled", views={"input": ViewSpec("npy", (DIM,))}, labels=True,
                                      num_classes=7, shards=tuple(shards), source="test"))
    return keys


def write_splits(root: Path) -> dict[str, Path]:
    """The held-out splits every world size is evaluated on."""
    splits = {"labeled": root / "labeled", "one_shard": root / "one_shard", "two_items": root / "two_items"}
    write_labeled(splits["labeled"], [40, 13, 57, 1, 29], seed=0)  # uneven shards: ranks split some
    write_labeled(splits["one_shard"], [50], seed=1)  # fewer shards than ranks
    write_labeled(splits["two_items"], [2], seed=2)  # with 3 ranks, one rank has no sample
    rng = np.random.default_rng(3)
    np.savez(root / "vectors.npz", inputs=rng.standard_normal((60, DIM)).astype(np.float32),
             labels=rng.integers(0, 5, 60))
    for kind in ("pairs", "triplets"):
        write_shards(str(root / "vectors.npz"), kind, root / kind, samples_per_shard=17, pairs_per_item=2, seed=4)
        splits[kind] = root / kind
    return splits


def run_config() -> Config:
    return config.load(None, ["eval.batch_size=8", "eval.recall_k=3"])


def metrics_of(splits: dict[str, Path], collective: ProcessGroupCollective | None = None) -> dict[str, dict]:
    torch.manual_seed(0)
    model, cfg = RowWise(), run_config()
    return {name: evaluate(model, cfg, torch.device("cpu"), str(path), collective) for name, path in splits.items()}


@pytest.mark.parametrize(("sizes", "world"), [([40, 13, 57, 1, 29], 2), ([40, 13, 57, 1, 29], 3), ([50], 3),
                                              ([5], 8), ([3, 0, 4], 4)])
def test_shares_are_disjoint_contiguous_and_complete(tmp_path: Path, sizes: list[int], world: int) -> None:
    keys = write_labeled(tmp_path / "split", sizes, seed=5)
    cfg = DataConfig(batch_size=4)
    shares = [[key for batch in eval_batches(tmp_path / "split", cfg, batch_size=4, rank=rank, world_size=world)
               for key in batch["keys"]] for rank in range(world)]
    assert [key for share in shares for key in share] == keys  # rank order = index order, each sample once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_share_reads_only_the_shards_it_overlaps(tmp_path: Path) -> None:
    write_labeled(tmp_path / "split", [10, 10, 10], seed=6)
    index = read_index(tmp_path / "split")
    assert eval_share(index, 0, 2) == {"shard-000000.tar": (0, 10), "shard-000001.tar": (0, 5)}
    assert eval_share(index, 1, 2) == {"shard-000001.tar": (5, 10), "shard-000002.tar": (0, 10)}


def _worker(rank: int, world: int, splits: dict[str, Path], expected: dict) -> None:
    torch.set_num_threads(1)
    got = metrics_of(splits, ProcessGroupCollective())
    for name in splits:
        assert got[name] == expected[name], f"{name}: {got[name]} != one process {expected[name]}"


@pytest.mark.parametrize("world", [2, 3])
def test_workers_evaluate_exactly_as_one_process(tmp_path: Path, world: int) -> None:
    splits = write_splits(tmp_path)
    expected = metrics_of(splits)
    assert expected["labeled"]["num_queries"] == 140 and 0.0 < expected["labeled"]["map_at_r"] < 1.0
    assert {"roc_auc", "eer"} <= set(expected["pairs"]) and "triplet_accuracy" in expected["triplets"]
    for direction in ("a2b", "b2a"):  # pair retrieval, over items repeated across pairs (deduplicated by content)
        pairs = expected["pairs"]
        recalls = [pairs[f"retrieval_{direction}/recall_at_{k}"] for k in (1, 3, 5)]
        assert recalls == sorted(recalls) and 0.0 < recalls[-1] < 1.0, recalls
        assert 0.0 < pairs[f"retrieval_{direction}/ndcg_at_3"] < 1.0 and pairs[f"retrieval_{direction}/num_queries"] > 0
    assert expected["two_items"]["num_queries"] in (0.0, 2.0)
    run_ranks(_worker, world, splits, expected)
