"""Write a SOURCE as WebDataset tar shards of labeled samples, pairs or triplets, plus an index.json.

    twinscale shards digits --kind labeled --out data/digits --test-fraction 0.4
    python -c "from pathlib import Path; from trainer.data.writer import write_shards; \\
               write_shards('digits', 'pairs', Path('data/digit-pairs'), test_fraction=0.4)"

Pairs and triplets are sampled from a labeled source with the seed; text files of pairs or triplets are written
as given (triplets written as pairs give a similar and a dissimilar pair each). Everything is written into a
hidden sibling directory and renamed into place when complete, so a failure leaves no half-written output behind.
"""

from __future__ import annotations

import itertools
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import webdataset as wds

from trainer.data.formats import (
    INDEX_FILE,
    KIND_VIEWS,
    SHARD_PATTERN,
    ShardIndex,
    ShardInfo,
    ViewSpec,
    cls_member,
    write_index,
)
from trainer.data.sources import Item, Source, read_source
from trainer.errors import DataError

# A sample to write: its key, one item per view of the kind, and the similarity flag of a pair.
Tuple = tuple[str, tuple[Item, ...], bool | None]
SPLIT_STREAMS = {None: 0, "train": 1, "test": 2}


def write_shards(source: str, kind: str, out_dir: str | Path, *, test_fraction: float | None = None, seed: int = 0,
                 samples_per_shard: int = 128, pairs_per_item: int = 1, as_images: bool = False,
                 overwrite: bool = False) -> dict[str, ShardIndex]:
    """Write SOURCE as `kind` shards; returns {"train": …, "test": …} when split, else {"all": …}.

    With `test_fraction` the labeled items (or the explicit tuples) are split, stratified by class, before
    pairs/triplets are sampled, into `out_dir/train/` and `out_dir/test/`; without it, into `out_dir/`.
    `pairs_per_item` pairs or triplets are sampled per labeled item.
    """
    _check_arguments(kind, test_fraction, samples_per_shard, pairs_per_item)
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    data = read_source(source, as_images=as_images)
    _check_kind(data, kind)
    splits = split_records(data, test_fraction, seed)
    with staged_output(out_dir) as staging:
        indexes = {}
        for split, positions in splits.items():
            directory = staging / split if split else staging
            tuples = _tuples(data, kind, positions, pairs_per_item, np.random.default_rng([seed % 2**63,
                                                                                          SPLIT_STREAMS[split]]))
            indexes[split or "all"] = _write_split(directory, data, kind, tuples, samples_per_shard, split)
    return indexes


def shards_exist(directory: str | Path) -> bool:
    """Whether `directory` holds a written shard set (an index.json)."""
    return (Path(directory) / INDEX_FILE).is_file()


def split_records(data: Source, test_fraction: float | None, seed: int) -> dict[str | None, list[int]]:
    """Seeded record positions per split: {None: all} or a {"train", "test"} split stratified by class."""
    positions = np.arange(len(data.records))
    if test_fraction is None:
        return {None: np.random.default_rng(seed % 2**63).permutation(positions).tolist()}
    from sklearn.model_selection import train_test_split  # late: only needed when splitting

    stratify = [record[0].label for record in data.records] if data.form == "labeled" else None
    try:
        train, test = train_test_split(positions, test_size=test_fraction, random_state=seed % 2**32,
                                       stratify=stratify)
    except ValueError as error:
        raise DataError(f"{data.name}: cannot split {len(positions)} records with test_fraction={test_fraction} "
                        f"({error}); every class needs at least 2 items and both splits one item per class") from None
    return {"train": train.tolist(), "test": test.tolist()}


def _check_arguments(kind: str, test_fraction: float | None, samples_per_shard: int, pairs_per_item: int) -> None:
    if kind not in KIND_VIEWS:
        raise DataError(f"--kind {kind!r}: expected one of {', '.join(KIND_VIEWS)}")
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction {test_fraction}: must be between 0 and 1 (exclusive)")
    if samples_per_shard < 1 or pairs_per_item < 1:
        raise DataError(f"samples_per_shard ({samples_per_shard}) and pairs_per_item ({pairs_per_item}) must be ≥ 1")


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty `out_dir` unless `overwrite`, before any work is done."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir}: already exists and is not empty; remove it or pass --overwrite")


def _check_kind(data: Source, kind: str) -> None:
    if data.form != "labeled" and data.form != kind and (data.form, kind) != ("triplets", "pairs"):
        raise DataError(f"{data.name}: holds explicit {data.form}, which cannot be written as {kind}; "
                        f"use kind {data.form}")


def _tuples(data: Source, kind: str, positions: list[int], per_item: int, rng: np.random.Generator) -> Iterator[Tuple]:
    if data.form == "triplets" and kind == "pairs":
        return triplets_as_pairs(data, positions)
    if data.form != "labeled":
        flags: list[bool | None] = list(data.similar) or [None] * len(data.records)
        return ((f"{p:08d}", data.records[p], flags[p]) for p in positions)
    items = [data.records[p][0] for p in positions]
    if kind == "labeled":
        return ((f"{p:08d}", (item,), None) for p, item in zip(positions, items, strict=True))
    return sample_tuples(items, kind, per_item, rng, data.name)


def triplets_as_pairs(data: Source, positions: list[int]) -> Iterator[Tuple]:
    """Each explicit triplet (anchor, positive, negative) as a similar and a dissimilar pair, in one split."""
    for p in positions:
        anchor, positive, negative = data.records[p]
        yield f"{p:08d}-positive", (anchor, positive), True
        yield f"{p:08d}-negative", (anchor, negative), False


def sample_tuples(items: list[Item], kind: str, per_item: int, rng: np.random.Generator,
                  name: str = "source") -> Iterator[Tuple]:
    """Seeded pairs (half similar) or triplets from labeled items, `per_item` rounds over every item as anchor."""
    classes = ClassIndex([int(item.label) for item in items if item.label is not None])
    if classes.num_classes < 2:
        raise DataError(f"{name}: {kind} need at least 2 classes, found {classes.num_classes}")
    total = len(items) * per_item
    flags = rng.permutation(np.arange(total) % 2 == 0)
    for number in range(total):
        anchor = number % len(items)
        if kind == "pairs":
            similar = bool(flags[number])
            other = classes.positive(anchor, rng) if similar else classes.negative(anchor, rng)
            yield f"{number:08d}", (items[anchor], items[other]), similar
        else:
            picks = (anchor, classes.positive(anchor, rng), classes.negative(anchor, rng))
            yield f"{number:08d}", tuple(items[i] for i in picks), None


class ClassIndex:
    """Items grouped by class (positions sorted by label), for O(1) seeded positive and negative draws."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = np.asarray(labels)
        self.order = np.argsort(self.labels, kind="stable")
        classes, starts, counts = np.unique(self.labels[self.order], return_index=True, return_counts=True)
        self.num_classes = len(classes)
        self.span = {int(c): (int(s), int(n)) for c, s, n in zip(classes, starts, counts, strict=True)}

    def positive(self, anchor: int, rng: np.random.Generator) -> int:
        """Another item of the anchor's class (the anchor itself when its class has one item)."""
        start, count = self.span[int(self.labels[anchor])]
        if count == 1:
            return anchor
        # Draw among the first count-1 members; the anchor, if drawn, stands for the excluded last member.
        pick = int(self.order[start + int(rng.integers(count - 1))])
        return int(self.order[start + count - 1]) if pick == anchor else pick

    def negative(self, anchor: int, rng: np.random.Generator) -> int:
        """An item of any other class, uniformly over items."""
        start, count = self.span[int(self.labels[anchor])]
        draw = int(rng.integers(len(self.labels) - count))
        return int(self.order[draw if draw < start else draw + count])


def _write_split(directory: Path, data: Source, kind: str, tuples: Iterable[Tuple], samples_per_shard: int,
                 split: str | None) -> ShardIndex:
    return write_tuples(directory, kind, tuples, data.view_specs or data.spec, labeled=data.labeled,
                        num_classes=data.num_classes(),
                        samples_per_shard=samples_per_shard, split=split, source=data.name)


def write_tuples(directory: Path, kind: str, tuples: Iterable[Tuple], spec: ViewSpec | tuple[ViewSpec, ...], *,
                 labeled: bool,
                 num_classes: int | None, samples_per_shard: int, split: str | None = None,
                 source: str = "") -> ShardIndex:
    """Write `tuples` (consumed one shard at a time) as `kind` shards in `directory`, then its index.json.

    `spec` describes every view, or each view in KIND_VIEWS order (image–text pairs)."""
    directory.mkdir(exist_ok=True)
    shards = []
    for number, chunk in enumerate(_chunks(tuples, samples_per_shard)):
        name = SHARD_PATTERN.format(number)
        # One sample's bytes at a time (an image folder's files are read as they are written), not a shard's.
        _write_shard(directory / name, (tar_sample(kind, sample, labeled) for sample in chunk))
        shards.append(ShardInfo(name, len(chunk)))
    if not shards:
        raise DataError(f"{source}: the {split or 'whole'} split has no samples")
    specs = spec if isinstance(spec, tuple) else (spec,) * len(KIND_VIEWS[kind])
    views = dict(zip(KIND_VIEWS[kind], specs, strict=True))
    index = ShardIndex(kind=kind, views=views, labels=labeled, num_classes=num_classes,
                       shards=tuple(shards), split=split, source=source)
    write_index(directory, index)
    return index


def tar_sample(kind: str, sample: Tuple, labeled: bool) -> dict[str, bytes | str]:
    """The tar members of one sample: `<view>.<ext>` per view, class ids and the similar flag."""
    key, items, similar = sample
    members: dict[str, bytes | str] = {"__key__": key}
    for view, item in zip(KIND_VIEWS[kind], items, strict=True):
        members[f"{view}.{item.ext}"] = item.read()
        if labeled:
            members[cls_member(kind, view)] = str(item.label).encode("ascii")
    if similar is not None:
        members["similar"] = b"1" if similar else b"0"
    return members


def _write_shard(path: Path, samples: Iterable[dict[str, bytes | str]]) -> None:
    # Fixed owner and mtime: the same source and seed give byte-identical shards.
    with path.open("wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0, user="twinscale",
                                                   group="twinscale") as writer:
        for sample in samples:
            writer.write(sample)


def _chunks(tuples: Iterable[Tuple], size: int) -> Iterator[list[Tuple]]:
    iterator = iter(tuples)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling directory that replaces `out_dir` only if the block completes."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out_dir, "partial")
    try:
        yield staging
        _replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired = _sibling(out_dir, "old")
    out_dir.rename(retired / out_dir.name)
    staging.rename(out_dir)
    shutil.rmtree(retired, ignore_errors=True)


def _sibling(out_dir: Path, role: str) -> Path:
    # mkdir (not mkdtemp, which makes it private) so the output gets the usual permissions.
    path = out_dir.parent / f".{out_dir.name}.{role}-{secrets.token_hex(4)}"
    path.mkdir()
    return path
