"""Class-balanced "P classes × K samples" batches from a stream, for mining that needs in-batch positives.

PML's `MPerClassSampler` picks indices by class and so needs random access; a WebDataset stream has none.
`ClassBalancer` instead buffers the streamed samples per class and hands out a batch as soon as P classes each
hold K samples. Which P of the ready classes is drawn with a seeded generator, and the K samples of a class are
its oldest, so the batches depend only on the stream order and the seed (replayable, resumable).

Memory is bounded by `capacity` samples: a stream with many classes, or a few very frequent ones, would
otherwise buffer without limit while rare classes wait to reach K. When a new sample pushes the buffer past
the cap, one sample is dropped (and counted), the oldest of its class:
- of the largest class if that holds more than K: its surplus beyond one batch's worth costs no batch;
- else of the least-filled class (the first to reach that size on ties), the one furthest from K.
Dropping from the largest class even when it holds K or fewer would undo the progress of the classes closest
to a batch: in a simulated stream of 100 uniform classes, P = K = 4 and a cap of 64, that formed no batch at
all, while this rule used 36 % of the samples (77 % with a cap of 128). A cap near classes × (K − 1) uses
nearly every sample; a smaller one trades reads (`_take` tops a short rank up) for memory.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from trainer.config import DataConfig
from trainer.data.formats import ShardIndex
from trainer.errors import DataError

log = logging.getLogger(__name__)
Sample = TypeVar("Sample")
DEFAULT_BUFFER_BATCHES = 8
"""data.class_buffer null means this many batches' worth of samples."""


def check_balanced_shards(index: ShardIndex, cfg: DataConfig, shard_dir: str | Path) -> None:
    """P×K batches need labeled shards with class ids, and at least P classes; DataError says which is missing."""
    if cfg.classes_per_batch is None:
        return
    if index.kind != "labeled" or not index.labels:
        what = f"{index.kind} shards" + ("" if index.labels else " without class ids")
        raise DataError(f"{shard_dir}: data.classes_per_batch needs labeled shards with class ids (a `cls` member), "
                        f"but index.json describes {what}; write them with `twinscale shards SOURCE --kind "
                        f"labeled`, or unset data.classes_per_batch")
    if index.num_classes is not None and index.num_classes < cfg.classes_per_batch:
        raise DataError(f"{shard_dir}: data.classes_per_batch={cfg.classes_per_batch} exceeds the "
                        f"{index.num_classes} classes of the shard set; lower data.classes_per_batch")


class ClassBalancedBatches:
    """Pipeline stage in place of `wds.batched`: decoded labeled samples in, P×K collated batches out.

    `rng` is called when iteration starts (inside the DataLoader worker), so the class choice is seeded per
    (seed, epoch, rank, worker, pass) like the shuffle buffer. A slot from which no batch was formed raises:
    otherwise its rank would stream its shards again and again for nothing.
    """

    def __init__(self, cfg: DataConfig, collate: Callable[[list[dict[str, Any]]], Any],
                 rng: Callable[[], random.Random], slot: Callable[[], str]) -> None:
        if cfg.classes_per_batch is None:
            raise ValueError("ClassBalancedBatches needs data.classes_per_batch")
        self.classes, self.per_class = cfg.classes_per_batch, cfg.samples_per_class
        self.capacity = cfg.class_buffer or DEFAULT_BUFFER_BATCHES * cfg.batch_size
        self.collate, self.rng, self.slot = collate, rng, slot

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[Any]:
        balancer: ClassBalancer[dict[str, Any]] = ClassBalancer(self.classes, self.per_class, self.capacity,
                                                                self.rng())
        for sample in samples:
            batch = balancer.add(sample["labels"]["input"], sample)
            if batch is not None:
                yield self.collate(batch)
        if balancer.batches == 0:
            raise DataError(self._no_batch(balancer))
        if balancer.dropped_short:
            log.warning("%s: dropped %d sample(s) of classes short of %d to buffer at most data.class_buffer=%d; "
                        "about %d would keep them", self.slot(), balancer.dropped_short, self.per_class,
                        self.capacity, len(balancer.seen) * (self.per_class - 1) + self.classes * self.per_class)

    def _no_batch(self, balancer: ClassBalancer[dict[str, Any]]) -> str:
        need, possible = f"{self.classes} classes × {self.per_class} samples", balancer.possible_classes()
        if possible < self.classes:
            return (f"{self.slot()}: no batch of {need} can be formed: only {possible} of {len(balancer.seen)} "
                    f"class(es) decoded from these shards have {self.per_class} samples. Each shard goes whole to "
                    f"one slot: write shards that mix classes, use fewer data.loader_workers, or lower "
                    f"data.classes_per_batch or data.samples_per_class")
        return (f"{self.slot()}: no batch of {need} was formed before data.class_buffer={self.capacity} "
                f"overflowed ({balancer.dropped} sample(s) dropped); raise data.class_buffer")


class _ClassSizes:
    """Classes grouped by how many samples they buffer, to find the largest and smallest quickly."""

    def __init__(self) -> None:
        self.buckets: dict[int, dict[int, None]] = {}  # size → classes of that size, in arrival order
        self.top = 0

    def move(self, label: int, old: int, new: int) -> None:
        if old:
            del self.buckets[old][label]
        if new:
            self.buckets.setdefault(new, {})[label] = None
        self.top = max(self.top, new)
        while self.top and not self.buckets.get(self.top):
            self.top -= 1

    def largest(self) -> int:
        """The class holding the most samples (the first to reach that size on ties)."""
        return next(iter(self.buckets[self.top]))

    def smallest(self) -> int:
        """The class holding the fewest samples (the first to reach that size on ties); scans up to `top`."""
        size = next(size for size in range(1, self.top + 1) if self.buckets.get(size))
        return next(iter(self.buckets[size]))


class ClassBalancer(Generic[Sample]):
    """Buffers samples per class; `add` returns P classes × K samples (class-grouped) once P classes have K."""

    def __init__(self, classes_per_batch: int, samples_per_class: int, capacity: int, rng: random.Random) -> None:
        if classes_per_batch < 1 or samples_per_class < 1 or capacity < classes_per_batch * samples_per_class:
            raise ValueError(f"need P ≥ 1, K ≥ 1 and capacity ≥ P×K, got {classes_per_batch}, {samples_per_class}, "
                             f"{capacity}")
        self.classes_per_batch, self.samples_per_class, self.capacity = classes_per_batch, samples_per_class, capacity
        self.rng = rng
        self.buffers: dict[int, deque[Sample]] = {}
        self.sizes = _ClassSizes()
        self.ready: set[int] = set()
        """Classes buffering at least K samples."""
        self.seen: Counter[int] = Counter()
        """Samples of each class added so far (one int per class, to tell whether a batch was ever possible)."""
        self.buffered = self.peak = self.batches = 0
        self.dropped = self.dropped_short = 0
        """Samples dropped to stay within `capacity`; `dropped_short`: those of classes holding K or fewer."""

    def add(self, label: int, sample: Sample) -> list[Sample] | None:
        """Buffer one sample; return a batch when this sample completes one, else None."""
        self.buffers.setdefault(label, deque()).append(sample)
        self._resized(label, +1)
        self.seen[label] += 1
        batch = self._take_batch() if len(self.ready) >= self.classes_per_batch else None
        while self.buffered > self.capacity:
            self._drop_one()
        self.peak = max(self.peak, self.buffered)
        return batch

    def possible_classes(self) -> int:
        """Classes with at least K samples so far: fewer than P means no batch could ever have been formed."""
        return sum(1 for count in self.seen.values() if count >= self.samples_per_class)

    def _take_batch(self) -> list[Sample]:
        classes = self.rng.sample(sorted(self.ready), self.classes_per_batch)
        self.batches += 1
        return [sample for label in classes for sample in self._pop(label, self.samples_per_class)]

    def _drop_one(self) -> None:
        label = self.sizes.largest()
        if len(self.buffers[label]) <= self.samples_per_class:
            label = self.sizes.smallest()
            self.dropped_short += 1
        self._pop(label, 1)
        self.dropped += 1

    def _pop(self, label: int, count: int) -> list[Sample]:
        buffer = self.buffers[label]
        taken = [buffer.popleft() for _ in range(count)]
        if not buffer:
            del self.buffers[label]
        self._resized(label, -count)
        return taken

    def _resized(self, label: int, change: int) -> None:
        new = len(self.buffers.get(label, ()))
        self.buffered += change
        self.sizes.move(label, new - change, new)
        if new >= self.samples_per_class:
            self.ready.add(label)
        else:
            self.ready.discard(label)
