"""Write a SOURCE as WebDataset tar shards of labeled samples, pairs or triplets, plus an index.json.

    twinscale shards digits --kind labeled --out data/digits --test-fraction 0.4
    python -c "from pathlib import Path; from trainer.data.writer import write_shards; \\
               write_shards('digits', 'pairs', Path('data/digit-pairs'), test_fraction=0.4)"

Pairs and triplets are sampled from a labeled source with the seed; tables of pairs or triplets (CSV, JSONL,
Parquet) are written as given, streamed row by row in file order (triplets written as pairs give a similar and a
dissimilar pair each). Memory stays O(shard) for such tables, whatever their size; a labeled source is held whole
(sampling pairs and a stratified split need every item; an image folder holds paths, not bytes).

Shards are cut from one deterministic sequence of samples per split (shard j holds samples j·N … j·N+N-1), so
`workers` processes write byte-identical output to one process. Output is staged: locally a hidden sibling
directory renamed into place when complete; on object storage (`s3://…`) the shards first and every index.json
last, so a set is never readable as complete before it is, and a failure removes what it wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import secrets
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from trainer.data import remote
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
from trainer.data.packed import pack_block
from trainer.data.sources import ImageSummary, Item, Source, Table, read_source
from trainer.errors import DataError

# A sample to write: its key, one item per view of the kind, and the similarity flag of a pair.
Tuple = tuple[str, tuple[Item, ...], bool | None]
SPLIT_STREAMS = {None: 0, "train": 1, "test": 2}


def write_shards(source: str, kind: str, out_dir: str | Path, *, test_fraction: float | None = None, seed: int = 0,
                 samples_per_shard: int = 128, pairs_per_item: int = 1, as_images: bool = False,
                 overwrite: bool = False, workers: int = 1, pack: int = 1) -> dict[str, ShardIndex]:
    """Write SOURCE as `kind` shards; returns {"train": …, "test": …} when split, else {"all": …}.

    With `test_fraction`, into `out_dir/train/` and `out_dir/test/`; without it, into `out_dir/` (a directory or
    an `s3://…` URL). Labeled items are split stratified by class before pairs/triplets are sampled
    (`pairs_per_item` per item); the rows of a pairs/triplets table each go to the test split when
    blake2b(seed, the row's first column) < test_fraction (`in_test_split`), so the split streams, rows sharing
    their first column (a query, an image) stay together, and its size is test_fraction only on average.
    `workers` processes write the shards (the output is the same as with one). With `pack` > 1, each tar sample
    is a block of up to `pack` samples (npy and txt views only; trainer/data/packed.py).
    """
    if pack < 1:
        raise DataError(f"--pack must be at least 1, got {pack}")
    _check_arguments(kind, test_fraction, samples_per_shard, pairs_per_item, workers)
    target = open_target(str(out_dir), overwrite)
    data = read_source(source, as_images=as_images)
    _check_kind(data, kind)
    with target.staged() as staging, ShardPool(workers) as pool:
        if isinstance(data, Table):
            return _write_table(data, kind, staging, pool, test_fraction, seed, samples_per_shard, pack)
        splits = split_records(data, test_fraction, seed)
        sinks = {}
        for split, positions in splits.items():
            tuples = _tuples(data, kind, positions, pairs_per_item, np.random.default_rng([seed % 2**63,
                                                                                          SPLIT_STREAMS[split]]))
            sinks[split] = ShardSink(_split_location(staging, split), kind, data.labeled, samples_per_shard, pool,
                                     pack=pack)
            sinks[split].extend(tuples)
        specs = data.view_specs or data.spec
        return _publish(sinks, kind, specs, labeled=data.labeled, num_classes=data.num_classes(), source=data.name,
                        pack=pack)


def in_test_split(seed: int, key: bytes, fraction: float) -> bool:
    """Whether a record whose split key is `key` belongs to the test split: a seeded hash below `fraction`.

    Decided per record, without reading the others: the split streams, and a row keeps its split when rows are
    added or reordered."""
    digest = hashlib.blake2b(key, digest_size=8, salt=(seed % 2**64).to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def _write_table(table: Table, kind: str, location: str, pool: ShardPool, test_fraction: float | None, seed: int,
                 samples_per_shard: int, pack: int = 1) -> dict[str, ShardIndex]:
    """Stream a table's rows into shards (one pass; labels and image headers summarised on the way)."""
    splits: tuple[str | None, ...] = ("train", "test") if test_fraction is not None else (None,)
    images = (0,) if table.images else ()
    sinks = {split: ShardSink(_split_location(location, split), kind, table.labeled, samples_per_shard, pool, images,
                              pack=pack)
             for split in splits}
    classes: set[int] = set()
    records = 0
    for number, (key, items, similar) in enumerate(table.records()):
        records += 1
        classes.update(item.label for item in items if item.label is not None)
        split = None if test_fraction is None else ("test" if in_test_split(seed, key, test_fraction) else "train")
        if table.form == "triplets" and kind == "pairs":
            sinks[split].add((f"{number:08d}-positive", items[:2], True))
            sinks[split].add((f"{number:08d}-negative", (items[0], items[2]), False))
        else:
            sinks[split].add((f"{number:08d}", items, similar))
    if not records:
        raise DataError(f"{table.name}: no records")
    return _publish(sinks, kind, None, labeled=table.labeled, num_classes=len(classes) if table.labeled else None,
                    source=table.name, pack=pack)


def _split_location(location: str, split: str | None) -> str:
    return remote.join(location, split) if split else location


def _publish(sinks: dict[str | None, ShardSink], kind: str, specs: ViewSpec | tuple[ViewSpec, ...] | None, *,
             labeled: bool, num_classes: int | None, source: str, pack: int = 1) -> dict[str, ShardIndex]:
    """Wait for every shard of every split, then write each split's index.json (last: the set is complete)."""
    written = {split: sink.close() for split, sink in sinks.items()}
    indexes = {}
    for split, (shards, images) in written.items():
        if not shards:
            hint = "; use a larger --test-fraction or more rows" if split == "test" else ""
            raise DataError(f"{source}: the {split or 'whole'} split has no samples{hint}")
        view_specs = specs
        if view_specs is None:  # a table: its texts as txt, an image column summarised from the image headers
            text = ViewSpec("txt", None)
            view_specs = (images[0].spec(), text) if images else (text,) * len(KIND_VIEWS[kind])
        index = _shard_index(kind, view_specs, labeled, num_classes, shards, split, source)
        indexes[split] = dataclasses.replace(index, pack=pack)
    for split, index in indexes.items():
        publish_index(sinks[split].location, index)
    return {split or "all": index for split, index in indexes.items()}


def _shard_index(kind: str, spec: ViewSpec | tuple[ViewSpec, ...], labeled: bool, num_classes: int | None,
                 shards: list[ShardInfo], split: str | None, source: str) -> ShardIndex:
    specs = spec if isinstance(spec, tuple) else (spec,) * len(KIND_VIEWS[kind])
    views = dict(zip(KIND_VIEWS[kind], specs, strict=True))
    return ShardIndex(kind=kind, views=views, labels=labeled, num_classes=num_classes, shards=tuple(shards),
                      split=split, source=source)


def publish_index(location: str, index: ShardIndex) -> None:
    """Write `location/index.json` (a directory or a URL), whole or not at all."""
    if remote.is_url(location):
        remote.write_bytes(remote.join(location, INDEX_FILE), (json.dumps(index.to_json(), indent=2) + "\n").encode())
    else:
        write_index(Path(location), index)


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


def _check_arguments(kind: str, test_fraction: float | None, samples_per_shard: int, pairs_per_item: int,
                     workers: int = 1) -> None:
    if workers < 1:
        raise DataError(f"--workers {workers}: must be ≥ 1")
    if kind not in KIND_VIEWS:
        raise DataError(f"--kind {kind!r}: expected one of {', '.join(KIND_VIEWS)}")
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction {test_fraction}: must be between 0 and 1 (exclusive)")
    if samples_per_shard < 1 or pairs_per_item < 1:
        raise DataError(f"samples_per_shard ({samples_per_shard}) and pairs_per_item ({pairs_per_item}) must be ≥ 1")


def open_target(location: str, overwrite: bool) -> LocalTarget | RemoteTarget:
    """Where shards go, checked before any work: a non-empty target is refused unless `overwrite`."""
    if remote.is_url(location):
        if location.startswith("pipe:"):
            raise DataError(f"--out {location}: shards are written to a directory or an object-storage URL")
        return RemoteTarget(location, overwrite)
    check_target(Path(location), overwrite)
    return LocalTarget(Path(location))


class LocalTarget:
    """A local output directory, replaced only when every shard and index is written (`staged_output`)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    @contextmanager
    def staged(self) -> Iterator[str]:
        with staged_output(self.out_dir) as staging:
            yield str(staging)


class RemoteTarget:
    """An object-storage prefix (s3://bucket/prefix). Objects cannot be renamed, so staging is by order: every
    shard first, each index.json last (a reader sees a set only once it is complete); an overwrite removes the old
    index.json files before anything else, and a failure removes what was written."""

    def __init__(self, url: str, overwrite: bool) -> None:
        self.url = url.rstrip("/")
        self.fs, self.path = remote.filesystem(self.url)
        self.existing = self._objects()
        if self.existing and not overwrite:
            raise DataError(f"{self.url}: already holds {len(self.existing)} object(s); choose an empty prefix or "
                            f"pass --overwrite")

    def _objects(self) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(remote.with_retries(self.url, lambda: self.fs.find(self.path)))
        except FileNotFoundError:
            return []

    def _remove(self, objects: list[str]) -> None:
        indexes = [name for name in objects if name.rsplit("/", 1)[-1] == INDEX_FILE]
        for batch in (indexes, [name for name in objects if name not in set(indexes)]):
            if batch:
                remote.with_retries(self.url, lambda batch=batch: self.fs.rm(batch))

    @contextmanager
    def staged(self) -> Iterator[str]:
        self._remove(self.existing)  # index.json first: the old set stops being readable before it is half gone
        try:
            yield self.url
        except BaseException:
            try:
                self._remove(self._objects())
            except Exception:  # noqa: S110 (the original error matters more; no index.json was written)
                pass
            raise


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty `out_dir` unless `overwrite`, before any work is done."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir}: already exists and is not empty; remove it or pass --overwrite")


def _check_kind(data: Source | Table, kind: str) -> None:
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


def write_tuples(directory: Path, kind: str, tuples: Iterable[Tuple], spec: ViewSpec | tuple[ViewSpec, ...], *,
                 labeled: bool,
                 num_classes: int | None, samples_per_shard: int, split: str | None = None,
                 source: str = "", pack: int = 1) -> ShardIndex:
    """Write `tuples` (consumed one shard at a time) as `kind` shards in `directory`, then its index.json.

    `spec` describes every view, or each view in KIND_VIEWS order (image–text pairs)."""
    with ShardPool(1) as pool:
        sink = ShardSink(str(directory), kind, labeled, samples_per_shard, pool, pack=pack)
        sink.extend(tuples)
        return _publish({split: sink}, kind, spec, labeled=labeled, num_classes=num_classes,
                        source=source, pack=pack)[split or "all"]


class ShardPool:
    """Runs shard writes in this process (workers=1) or in a pool of `workers` processes, with at most two per
    worker in flight so that memory stays O(shard × workers) however long the input."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor: ProcessPoolExecutor | None = None
        self.pending: deque[Future[Any]] = deque()

    def __enter__(self) -> ShardPool:
        if self.workers > 1:
            # forkserver: workers start clean (no copy of the reader's state, threads or storage connections). The
            # fork server may be older than this call: the workers take this process's environment (credentials).
            self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"),
                                                initializer=_adopt_environment, initargs=(dict(os.environ),))
        return self

    def __exit__(self, *failure: object) -> None:
        if self.executor is not None:  # on failure: drop queued shards, wait for running ones, then unstage
            self.executor.shutdown(wait=True, cancel_futures=failure[0] is not None)

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        """`function(*args)` now (one process) or in a worker; raises the first failure of an earlier write."""
        if self.executor is None:
            done: Future[Any] = Future()
            done.set_result(function(*args))
            return done
        while len(self.pending) >= 2 * self.workers:
            self.pending.popleft().result()
        future = self.executor.submit(function, *args)
        self.pending.append(future)
        return future


def _adopt_environment(environment: dict[str, str]) -> None:
    """A pool worker's environment: the writer's, as it is now (storage endpoint and credentials)."""
    os.environ.clear()
    os.environ.update(environment)


class ShardSink:
    """One split's samples, cut into shards of `samples_per_shard` in arrival order and written by `pool`."""

    def __init__(self, location: str, kind: str, labeled: bool, samples_per_shard: int, pool: ShardPool,
                 image_views: tuple[int, ...] = (), pack: int = 1) -> None:
        self.location, self.kind, self.labeled, self.size, self.pool = location, kind, labeled, samples_per_shard, pool
        self.pack = pack
        """Samples per tar sample (trainer/data/packed.py); 1: unpacked."""
        self.image_views = image_views
        """Positions of the views whose image headers are summarised into the view spec (an image table)."""
        self.chunk: list[Tuple] = []
        self.shards: list[tuple[str, Future[ShardSummary]]] = []
        if not remote.is_url(location):
            Path(location).mkdir(exist_ok=True)

    def add(self, sample: Tuple) -> None:
        self.chunk.append(sample)
        if len(self.chunk) == self.size:
            self._flush()

    def extend(self, samples: Iterable[Tuple]) -> None:
        for sample in samples:
            self.add(sample)

    def _flush(self) -> None:
        if self.chunk:
            name = SHARD_PATTERN.format(len(self.shards))
            self.shards.append((name, self.pool.submit(write_shard_file, remote.join(self.location, name), self.kind,
                                                       self.chunk, self.labeled, self.image_views, self.pack)))
            self.chunk = []

    def close(self) -> tuple[list[ShardInfo], list[ImageSummary]]:
        """Every shard written: their infos, and the image summaries merged over shards (per image view)."""
        self._flush()
        infos, images = [], [ImageSummary() for _ in self.image_views]
        for name, future in self.shards:
            summary = future.result()
            infos.append(ShardInfo(name, summary.samples))
            for merged, part in zip(images, summary.images, strict=True):
                merged.merge(part)
        return infos, images


class ShardSummary:
    """What writing one shard tells the index: its sample count and its image views' header summaries."""

    def __init__(self, samples: int, images: list[ImageSummary]) -> None:
        self.samples, self.images = samples, images


def write_shard_file(location: str, kind: str, samples: list[Tuple], labeled: bool,
                     image_views: tuple[int, ...] = (), pack: int = 1) -> ShardSummary:
    """Write one shard (a path or a URL) and summarise its image views; runs in a pool worker or in-process."""
    images = [ImageSummary() for _ in image_views]

    def members() -> Iterator[dict[str, bytes | str]]:
        for sample in samples:
            for summary, position in zip(images, image_views, strict=True):
                item = sample[1][position]
                if item.path is not None:
                    summary.add(item.path, item.ext)
            yield tar_sample(kind, sample, labeled)

    def blocks() -> Iterator[dict[str, bytes | str]]:  # `pack` consecutive samples each (pack_block refuses images)
        for number, start in enumerate(range(0, len(samples), pack)):
            yield pack_block(kind, samples[start:start + pack], labeled, number)

    written = blocks() if pack > 1 else members()
    if remote.is_url(location):
        _put_shard(location, written)
    else:
        _write_shard(Path(location), written)
    return ShardSummary(len(samples), images)


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
    with path.open("wb") as stream:
        _write_tar(stream, samples)


def _write_tar(stream: Any, samples: Iterable[dict[str, bytes | str]]) -> None:
    # Fixed owner and mtime: the same source and seed give byte-identical shards.
    with wds.TarWriter(stream, encoder=False, mtime=0, user="twinscale", group="twinscale") as writer:
        for sample in samples:
            writer.write(sample)


def _put_shard(url: str, samples: Iterable[dict[str, bytes | str]]) -> None:
    """One shard to object storage: built in memory (one shard), then one PUT with retries, never partial."""
    buffer = io.BytesIO()
    _write_tar(buffer, samples)  # TarWriter leaves a stream it did not open unclosed
    try:
        remote.write_bytes(url, buffer.getvalue())
    except FileNotFoundError:
        raise DataError(f"{url}: cannot write (no such bucket?)") from None


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
