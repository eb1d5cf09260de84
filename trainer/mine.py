"""Index-mined hard negatives: turn labeled shards into triplet shards whose negatives a trained model confuses.

    twinscale mine runs/NAME data/digits/train --out data/hard/train --skip-top 5 --window 50 --per-anchor 2
    twinscale mine runs/NAME data/digits/test --out data/hard/test
    twinscale train RECIPE.yaml --set data.train=data/hard/train --set data.test=data/hard/test

Every sample is embedded with the run's exported model and put in a faiss inner-product index (embeddings are
unit length, so inner product is cosine similarity). For each anchor the nearest neighbours (the anchor itself
excluded) are ranked; the first `skip_top` ranks are skipped, since the very nearest items of another class are
often near-duplicates or unlabeled positives (false negatives), and `per_anchor` negatives are drawn with the
seed among the items of another class in ranks [skip_top, skip_top + window). Each triplet's positive is a
random other item of the anchor's class; anchors whose class has one item are skipped and counted.

The source members (npy/png/jpg/txt) are copied byte for byte from the tar files, never decoded and re-encoded,
and the output is written through the shard writer's staging directory, so a failure leaves nothing behind.
The statistics also go to DIR/mining.json.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from trainer.data import remote
from trainer.data.formats import ShardIndex
from trainer.data.shardsets import open_data
from trainer.data.sources import Item
from trainer.data.writer import ClassIndex, Tuple, check_target, staged_output, write_tuples
from trainer.embed import embed_shards, load_model, shard_set_config
from trainer.engine.build import input_spec
from trainer.errors import DataError, UserError
from trainer.models.towers import InputSpec

MINING_FILE = "mining.json"
# Neighbour ids held per search call (queries × k): bounds memory on corpora of any size.
SEARCH_BUDGET = 1 << 22


@dataclass(frozen=True)
class MiningWindow:
    """Where negatives come from in each anchor's neighbour ranking, and how many to keep."""

    skip_top: int
    """Nearest ranks skipped (likely near-duplicates or unlabeled positives)."""
    window: int
    """Ranks after those in which negatives of another class are looked for."""
    per_anchor: int
    """Negatives (one triplet each) kept per anchor."""
    seed: int
    """Seed of the negative and positive draws."""

    def check(self) -> None:
        """Raise UserError naming the flag that cannot work."""
        if self.skip_top < 0:
            raise UserError(f"--skip-top {self.skip_top}: must be ≥ 0")
        if self.window <= 0:
            raise UserError(f"--window {self.window}: must be ≥ 1")
        if self.per_anchor <= 0:
            raise UserError(f"--per-anchor {self.per_anchor}: must be ≥ 1")


@dataclass
class MiningStats:
    """What a mining pass found; written to DIR/mining.json."""

    anchors: int = 0
    """Samples embedded, each one an anchor candidate."""
    triplets: int = 0
    """Triplets written."""
    anchors_without_negative: int = 0
    """Anchors with no item of another class in their rank window."""
    anchors_with_fewer_negatives: int = 0
    """Anchors with some, but fewer than per_anchor, negatives in their window."""
    anchors_without_positive: int = 0
    """Anchors skipped because their class has one item."""


def mine_hard_negatives(model_path: Path, shards: str | Path, out_dir: Path, window: MiningWindow, *,
                        samples_per_shard: int = 128, batch_size: int = 512, overwrite: bool = False,
                        overrides: Sequence[str] = ()) -> MiningStats:
    """Write triplet shards of index-mined hard negatives from the labeled shard set `shards` into `out_dir`.

    `shards`: any set data.train accepts (a Twinscale directory or URL, or a WebDataset pattern with the run's
    or the given field map); `overrides`: its `data.*` settings (trainer.embed.shard_set_config)."""
    window.check()
    if samples_per_shard < 1 or batch_size < 1:
        raise UserError(f"--samples-per-shard {samples_per_shard} and --batch-size {batch_size}: must be ≥ 1")
    shard_dir = str(shards)
    if not remote.is_url(shard_dir) and out_dir.resolve() == Path(shard_dir).resolve():
        raise UserError(f"--out {out_dir}: must differ from SHARDS (the source is read while writing)")
    check_target(out_dir, overwrite)
    model, document, cfg = load_model(model_path)
    cfg = shard_set_config(cfg, shard_dir, overrides)
    index = _labeled_index(shard_dir, open_data(shard_dir, cfg.data))
    exported = (getattr(model, "preprocessing", None) or {}).get("a")  # images of any size: the size it resizes to
    _check_model_input(document, input_spec(index, "input", cfg.data.text_buckets, exported), model_path, shard_dir)
    embeddings, labels, view_keys = embed_shards(model, cfg, shard_dir, batch_size)
    if labels is None:
        raise DataError(f"{shard_dir}: some samples have no class id")
    keys = [key.rsplit("/", 1)[0] for key in view_keys]
    triplets, stats = select_triplets(embeddings, np.asarray(labels, dtype=np.int64), window)
    if not len(triplets):
        raise DataError(f"{shard_dir}: no triplets mined ({stats.anchors_without_negative} anchors have no other "
                        f"class in ranks [{window.skip_top}, {window.skip_top + window.window})); lower --skip-top "
                        "or widen --window")
    with SourceMembers(shard_dir, index, keys) as members, staged_output(out_dir) as staging:
        view = dataclasses.replace(index.views["input"], ext=members.ext, alternatives=())
        write_tuples(staging, "triplets", triplet_samples(triplets, labels, members, members.ext),
                     view, labeled=True, num_classes=index.num_classes,
                     samples_per_shard=samples_per_shard, source=str(shard_dir))
        report = {**asdict(stats), **asdict(window), "model": str(model_path), "shards": str(shard_dir)}
        (staging / MINING_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return stats


def _labeled_index(shard_dir: str, index: ShardIndex) -> ShardIndex:
    if index.kind != "labeled" or not index.labels:
        raise DataError(f"{shard_dir}: holds {index.kind} shards{'' if index.labels else ' without class ids'}; "
                        "mining needs labeled shards with class ids (twinscale shards SOURCE --kind labeled)")
    if index.num_samples < 2:
        raise DataError(f"{shard_dir}: holds {index.num_samples} sample(s); mining needs at least 2")
    return index


def _check_model_input(document: dict[str, Any], shards_input: InputSpec, model_path: Path, shard_dir: str) -> None:
    # One tower embeds anchors and candidates alike, so they must share a space and the shards' input shape.
    if document["model"].get("architecture") == "pseudo_siamese":
        raise UserError(f"{model_path}: a pseudo-Siamese model embeds anchors and candidates with different "
                        "towers; mining needs a Siamese model")
    model_input = InputSpec.from_dict(document["inputs"]["a"])
    if (model_input.modality, model_input.shape) != (shards_input.modality, shards_input.shape):
        raise DataError(f"{shard_dir}: holds {shards_input.modality} inputs of shape {shards_input.shape}, but "
                        f"{model_path} takes {model_input.modality} inputs of shape {model_input.shape}")


def select_triplets(embeddings: torch.Tensor, labels: np.ndarray,
                    window: MiningWindow) -> tuple[np.ndarray, MiningStats]:
    """(anchor, positive, negative) rows [T, 3] of hard negatives from the rank window, and the counts."""
    stats = MiningStats(anchors=len(labels))
    classes = ClassIndex(labels.tolist())
    _, class_of, class_sizes = np.unique(labels, return_inverse=True, return_counts=True)
    counts = class_sizes[class_of]
    rng = np.random.default_rng(window.seed % 2**63)
    found: list[np.ndarray] = []
    for start, neighbours in nearest_neighbours(embeddings, window.skip_top + window.window):
        anchors = np.arange(start, start + len(neighbours))
        has_positive = counts[anchors] > 1
        stats.anchors_without_positive += int((~has_positive).sum())
        ranked = neighbours[has_positive, window.skip_top:]
        rows, negatives = choose_negatives(ranked, labels[anchors[has_positive]], labels, window.per_anchor, rng)
        kept = np.bincount(rows, minlength=len(ranked))
        stats.anchors_without_negative += int((kept == 0).sum())
        stats.anchors_with_fewer_negatives += int(((kept > 0) & (kept < window.per_anchor)).sum())
        found.append(np.stack([anchors[has_positive][rows], negatives], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    positives = np.array([classes.positive(int(anchor), rng) for anchor in pairs[:, 0]], dtype=np.int64)
    stats.triplets = len(pairs)
    return np.stack([pairs[:, 0], positives, pairs[:, 1]], axis=1), stats


def nearest_neighbours(embeddings: torch.Tensor, k: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first query row, neighbour ids [B, ≤ k] nearest first, the query itself excluded) per batch of queries.

    Queries are searched in batches of SEARCH_BUDGET // k rows, so at most SEARCH_BUDGET ids (and as many
    similarities) are held at once however large the corpus is.
    """
    import faiss  # late: only mining needs it

    vectors = np.ascontiguousarray(embeddings.detach().cpu().numpy(), dtype=np.float32)
    total = len(vectors)
    searched = min(k + 1, total)  # one more, since the query itself is usually its own nearest neighbour
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    step = max(1, SEARCH_BUDGET // max(1, searched))
    for start in range(0, total, step):
        _, ids = index.search(vectors[start : start + step], searched)
        yield start, _without_self(ids, np.arange(start, start + len(ids)))


def _without_self(ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
    # Drop the query from its own row; with exact duplicates it may not be first, or (with ties at the
    # cut-off) not returned at all, in which case the farthest id goes instead, so every row keeps k ids.
    drop = ids == queries[:, None]
    drop[~drop.any(axis=1), -1] = True
    return ids[~drop].reshape(len(ids), ids.shape[1] - 1)


def choose_negatives(ranked: np.ndarray, anchor_labels: np.ndarray, labels: np.ndarray, per_anchor: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_anchor` ids of another class per row of `ranked` (the window), drawn uniformly without
    replacement; returns (row of each pick, picked id)."""
    other = (ranked >= 0) & (labels[ranked.clip(min=0)] != anchor_labels[:, None])
    draw = np.where(other, rng.random(ranked.shape), np.inf)  # a random order; same-class items sort last
    order = np.argsort(draw, axis=1, kind="stable")[:, :per_anchor]
    rows, columns = np.nonzero(np.take_along_axis(other, order, axis=1))
    return rows, np.take_along_axis(ranked, order, axis=1)[rows, columns]


def triplet_samples(triplets: np.ndarray, labels: list[int], members: SourceMembers, ext: str) -> Iterator[Tuple]:
    """Writer tuples of the triplets, member bytes read lazily (one shard's worth held at a time)."""
    for number, rows in enumerate(triplets.tolist()):
        items = tuple(Item(ext, int(labels[row]), data=members.read(row)) for row in rows)
        yield f"{number:08d}", items, None


class SourceMembers:
    """Where each sample's input member lies in the source tar files, to copy its bytes unchanged.

    Only tar headers are scanned (no member is decoded; a remote shard is streamed once); reads seek to the
    recorded offset (a ranged read for a remote shard). Rows follow `keys`, the order in which the samples were
    embedded. A WebDataset set's input member is the one its field map names (`input: txt` → `<key>.txt`);
    the triplets are written with that one extension, so a set whose inputs mix extensions is refused.
    """

    MAX_OPEN = 64

    def __init__(self, shard_dir: str, index: ShardIndex, keys: list[str]) -> None:
        self.files = [index.url(shard.file) for shard in index.shards]
        view = index.views["input"]
        exts = (view.ext, *view.alternatives) if index.fields is not None else (view.ext,)
        members = {(ext if index.fields is not None else f"input.{ext}"): ext for ext in exts}
        found: dict[str, tuple[int, int, int]] = {}
        seen: set[str] = set()
        for number, location in enumerate(self.files):
            seen.update(_scan_shard(location, number, members, found))
        missing = next((key for key in keys if key not in found), None)
        if missing is not None:
            raise DataError(f"{shard_dir}: sample {missing} has no readable {' or '.join(members)} member")
        if len(seen) > 1:
            raise DataError(f"{shard_dir}: inputs of several kinds ({', '.join(sorted(seen))}); mining writes one "
                            "extension per view: mine each kind separately (a field map naming one extension)")
        self.ext = members[next(iter(seen))] if seen else view.ext
        """The extension of the input members (written as `anchor.<ext>`, …)."""
        self.locations = np.array([found[key] for key in keys], dtype=np.int64).reshape(len(keys), 3)
        self.handles: dict[int, BinaryIO] = {}

    def read(self, row: int) -> bytes:
        """The raw bytes of sample `row`'s input member."""
        shard, offset, size = (int(value) for value in self.locations[row])
        handle = self._handle(shard)
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise DataError(f"{self.files[shard]}: truncated member at byte {offset}")
        return data

    def _handle(self, shard: int) -> BinaryIO:
        if shard not in self.handles:
            if len(self.handles) >= self.MAX_OPEN:
                self.close()
            self.handles[shard] = _open_seekable(self.files[shard])
        return self.handles[shard]

    def close(self) -> None:
        """Close every open shard file."""
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()

    def __enter__(self) -> SourceMembers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scan_shard(location: str, number: int, members: dict[str, str],
                found: dict[str, tuple[int, int, int]]) -> set[str]:
    """Record (shard number, data offset, size) of every input member (a suffix in `members`) in one tar file,
    keyed as WebDataset keys it; returns the suffixes seen."""
    seen: set[str] = set()
    try:
        with remote.open_shard(location) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            for info in tar:
                key, suffix = base_plus_ext(info.name)
                if not info.isfile() or key is None or suffix.lower() not in members:
                    continue
                if key in found:
                    raise DataError(f"{location}: sample key {key} appears twice in the shard set; keys must be "
                                    "unique")
                found[key] = (number, info.offset_data, info.size)
                seen.add(suffix.lower())
    except (tarfile.TarError, remote.ShardReadError):
        pass  # a truncated or unreadable shard: samples before the damage were recorded, the stream skipped the rest
    return seen


def _open_seekable(location: str) -> BinaryIO:
    """A shard opened for reads at recorded offsets: a local file, or a remote object read by ranged requests."""
    if not remote.is_url(location):
        return open(location, "rb")
    fs, path = remote.filesystem(location)
    return remote.with_retries(location, lambda: fs.open(path, "rb", block_size=1 << 20))  # type: ignore[no-any-return]
