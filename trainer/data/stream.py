"""The training and evaluation input pipeline: shard sets streamed from WebDataset tar files into batches.

Training (`train_batches`): `plan_epoch` (trainer/data/plan.py) shuffles the shard list with (seed, epoch) and
assigns whole shards to world_size × loader_workers slots, from index.json alone, so every rank agrees on the same
number of batches without reading data (unequal counts hang DeepSpeed's collectives). Each slot streams its shards:
tar members (a packed set's blocks unpacked into samples, trainer/data/packed.py) → seeded shuffle buffer →
explicit decode of the declared members (trainer/data/decode.py) → full batches, or, with
data.classes_per_batch, class-balanced batches of P classes × K samples (trainer.data.balance). The stream depends
only on (seed, epoch, rank, worker), so an epoch can be replayed or resumed exactly. A rank's DataLoader workers
persist across epochs (`_RunLoader`), each streaming its slot of every epoch in turn.

Evaluation (`eval_batches`): every sample once, in index order, last partial batch kept; with several ranks each
streams a contiguous share of that order (`eval_share`).

A batch is a plain dict:
    views:   {view: what the view's Preprocessor collates (trainer/data/preprocess.py): float32 [B, *shape] (npy),
              float32 [B, C, H, W] images (in [0, 1] at their stored size, or cropped and normalised by
              ImagePreprocessor), TextBatch (hashed n-grams) or TokenBatch (a tokenizer's ids) for text}
    labels:  {view: int64 tensor [B]}, only when the shards carry class ids
    content: {view: int64 tensor [B]}, a hash of each item's member bytes (equal bytes, equal id)
    similar: float32 tensor [B], pairs only (1.0 for similar)
    keys:    list[str] of sample keys
    corrupt: int, corrupt samples and unreadable tar sections skipped so far by the worker that made the batch
    worker:  int, that DataLoader worker's id (0 without workers)
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import logging
import multiprocessing.util
import os
import random
import signal
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from trainer.config import DataConfig
from trainer.data.balance import ClassBalancedBatches, check_balanced_shards
from trainer.data.decode import BatchCollator, SampleDecoder, _WorkerState
from trainer.data.formats import ShardIndex
from trainer.data.packed import read_block
from trainer.data.plan import EpochPlan, eval_share, plan_epoch
from trainer.data.preprocess import (  # noqa: F401 - the decoders are re-exported for callers of this module
    Preprocessor,
    decode_image,
    decode_npy,
    decode_pixels,
    default_preprocessors,
)
from trainer.data.shardsets import open_data, shard_samples
from trainer.errors import DataError

log = logging.getLogger(__name__)
Batch = dict[str, Any]


def train_batches(shard_dir: str | Path, cfg: DataConfig, *, seed: int, epoch: int, rank: int, world_size: int,
                  skip_batches: int = 0, start: bool = False,
                  preprocessors: dict[str, Preprocessor] | None = None, persistent: bool = True) -> Iterator[Batch]:
    """Exactly `plan.batches_per_rank` training batches of this rank (the first `skip_batches` discarded).

    P×K batches keep this count, so the run's step count (planned from `plan_epoch` alone) does not change; a
    pass yields fewer of them (classes short of K at the end are unused), and `_take` tops the rank up.
    With `start`, the DataLoader of the first pass is started now rather than at the first `next`: its workers
    fill their shuffle buffers and first batches while the caller is still busy (the batches are the same).
    `preprocessors` (per view) come from the model; None means the toy encoders' (`default_preprocessors`).

    With loader workers and `persistent`, the first pass of each epoch comes from one DataLoader per rank whose
    workers stream epoch after epoch (`_RunLoader`): the call for epoch e+1 made while epoch e is still streamed
    (as TrainLoop.run does, with `start`) reuses epoch e's loader, whose workers go on into epoch e+1 as they
    finish epoch e, with no new processes and no shuffle buffer left to fill. The batches are those of a new
    loader per epoch (`persistent=False`); top-up passes (`_take`) still open a loader of their own.
    """
    index = open_data(str(shard_dir), cfg, train=True)
    given = id(preprocessors) if preprocessors is not None else None  # defaults: the same for the same set and cfg
    preprocessors = preprocessors or default_preprocessors(index, cfg)
    plan = epoch_plan(shard_dir, cfg, seed=seed, epoch=epoch, world_size=world_size, index=index)
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    check_balanced_shards(index, cfg, shard_dir)
    workers = cfg.workers_for(len(index.shards), world_size)

    def new_loader(number: int) -> torch.utils.data.DataLoader:
        stream = _StreamSeed(seed, epoch, rank, number)
        pipeline = _pipeline(index, cfg, preprocessors, plan.slots[rank], cfg.batch_size, stream=stream)
        # The loader draws its workers' base seed from `generator`, not from torch's global RNG: opening an epoch
        # must not move the stream that dropout draws from, or a resumed run would drift from an uninterrupted one.
        return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                           generator=stream.torch_generator(), collate_fn=_as_is,
                                           worker_init_fn=_ignore_stop_signals)

    run = None
    if persistent and workers > 0:
        run = _RunLoader.claim((str(shard_dir), cfg.model_dump_json(), given, seed, rank, world_size, workers),
                               epoch, lambda first: _EpochAfterEpoch(index, cfg, preprocessors, seed=seed, rank=rank,
                                                                     world_size=world_size, workers=workers,
                                                                     first_epoch=first))

    def open_pass(number: int) -> Iterable[Batch]:  # pass 0 from the run's loader, if any
        return run.epoch(epoch) if number == 0 and run is not None else new_loader(number)

    first = _worker_batches(open_pass(0)) if start else None
    return _take(open_pass, plan.batches_per_rank, skip_batches, f"{shard_dir} (rank {rank}, epoch {epoch})",
                 balanced=cfg.classes_per_batch is not None, first=first)


class _EpochAfterEpoch(torch.utils.data.IterableDataset):
    """A rank's training stream, epoch after epoch from `first_epoch`, for a DataLoader that lives for the run.

    Each DataLoader worker plans every epoch itself (`plan_epoch`, from index.json alone) and streams its own slot
    of it through the pipeline a per-epoch loader would build (seeded by (seed, epoch, rank, worker), pass 0), so
    its batches are the same; it yields (worker, epoch, batch) and, at the end of its slot, (worker, epoch, None)."""

    def __init__(self, index: ShardIndex, cfg: DataConfig, preprocessors: dict[str, Preprocessor], *, seed: int,
                 rank: int, world_size: int, workers: int, first_epoch: int) -> None:
        self.index, self.cfg, self.preprocessors = index, cfg, preprocessors
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers, self.first_epoch = workers, first_epoch

    def __iter__(self) -> Iterator[tuple[int, int, Batch | None]]:
        worker = _worker_id()
        for epoch in itertools.count(self.first_epoch):
            plan = plan_epoch(self.index, seed=self.seed, epoch=epoch, world_size=self.world_size,
                              loader_workers=self.workers, batch_size=self.cfg.batch_size,
                              epoch_samples=self.cfg.epoch_samples)
            stream = _StreamSeed(self.seed, epoch, self.rank, 0)
            for batch in _pipeline(self.index, self.cfg, self.preprocessors, plan.slots[self.rank],
                                   self.cfg.batch_size, stream=stream):
                yield worker, epoch, batch
            yield worker, epoch, None


class _RunLoader:
    """One rank's persistent DataLoader (over `_EpochAfterEpoch`) and the epochs handed out from it.

    The DataLoader returns its workers' batches strictly in turn; `epoch` serves one epoch in the order a loader
    of that epoch alone would: in turn over the workers still streaming it, a worker leaving the turn at the end
    of its slot (as a DataLoader stops asking an exhausted worker). Batches of workers already in the next
    epoch wait in `pending`, and whatever a consumer left of an earlier epoch is dropped. Shared by the epoch
    streams of one run (`claim`); it stops its workers when the last of them is gone (or at exit)."""

    _live: weakref.WeakValueDictionary[tuple[Any, ...], _RunLoader] = weakref.WeakValueDictionary()

    def __init__(self, dataset: _EpochAfterEpoch) -> None:
        self.workers, self.next_epoch = dataset.workers, dataset.first_epoch
        key = f"twinscale/{dataset.seed}/{dataset.rank}/run-from-{dataset.first_epoch}/loader".encode()
        generator = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(),
                                                                 "little"))
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=dataset.workers,
                                             generator=generator, collate_fn=_as_is,
                                             worker_init_fn=_ignore_stop_signals)
        self.iterator: Any = iter(loader)  # starts the workers now
        _LIVE_LOADERS[self.iterator] = os.getpid()
        self.pending: dict[int, collections.deque[tuple[int, Batch | None]]] = {
            worker: collections.deque() for worker in range(dataset.workers)}

    @classmethod
    def claim(cls, key: tuple[Any, ...], epoch: int, dataset: Callable[[int], _EpochAfterEpoch]) -> _RunLoader:
        """The live loader of `key` if `epoch` is the next one it has not handed out, else a new one from `epoch`."""
        run = cls._live.get(key)
        if run is None or run.next_epoch != epoch:
            run = cls(dataset(epoch))
            cls._live[key] = run
        run.next_epoch = epoch + 1
        return run

    def epoch(self, epoch: int) -> Generator[Batch, None, None]:
        """Pass 0 of `epoch`: every worker's batches until the end of its slot, in a per-epoch loader's order."""
        streaming = list(range(self.workers))
        try:
            while streaming:
                for worker in list(streaming):
                    batch = self._next(worker, epoch)
                    if batch is None:
                        streaming.remove(worker)
                    else:
                        yield batch
        except DataError:
            self.stop()
            raise

    def _next(self, worker: int, epoch: int) -> Batch | None:
        while True:
            while not self.pending[worker]:
                try:
                    source, its_epoch, batch = _tensors(next(self.iterator))
                except DataError as error:
                    raise DataError(_one_line(error)) from None
                self.pending[source].append((its_epoch, batch))
            its_epoch, batch = self.pending[worker].popleft()
            if its_epoch == epoch:
                return batch
            if its_epoch > epoch:
                raise DataError(f"loader worker {worker} streams epoch {its_epoch} before epoch {epoch} ended")

    def stop(self) -> None:
        """Stop the workers now (an error, or the end of the run)."""
        self.iterator._shutdown_workers()


def epoch_plan(shard_dir: str | Path, cfg: DataConfig, *, seed: int, epoch: int, world_size: int,
               index: ShardIndex | None = None) -> EpochPlan:
    """The plan of one training epoch, with errors naming the shard directory."""
    try:
        index = index or open_data(str(shard_dir), cfg, train=True)
        return plan_epoch(index, seed=seed, epoch=epoch, world_size=world_size,
                          loader_workers=cfg.workers_for(len(index.shards), world_size), batch_size=cfg.batch_size,
                          epoch_samples=cfg.epoch_samples)
    except DataError as error:
        raise DataError(f"{shard_dir}: {error}") from None


SMALL_TENSOR_BYTES = 1 << 20
"""Tensors up to this size cross from a loader worker pickled by value, as numpy arrays (`_ByValue`)."""


@dataclass(frozen=True)
class _ByValue:
    """A small tensor on its way from a loader worker: torch would put each tensor of a batch in a shared-memory
    segment of its own (a file, a descriptor passed over a socket, a mapping), which for a batch of small vectors,
    labels and content ids costs more than making the batch; pickled inline it costs a copy."""

    array: np.ndarray


def _as_is(batch: Any) -> Any:
    # The pipeline makes finished batches: torch's default (default_convert) would only walk and rebuild them. This
    # runs where the batch is made: in a loader worker, its small tensors are sent by value (`_tensors` restores them).
    return batch if torch.utils.data.get_worker_info() is None else _small_by_value(batch)


def _small_by_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        small = value.numel() * value.element_size() <= SMALL_TENSOR_BYTES and value.dtype != torch.bfloat16
        return _ByValue(value.numpy()) if small and not value.requires_grad else value
    if isinstance(value, dict):
        return {key: _small_by_value(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_small_by_value(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # TextBatch, TokenBatch
        return dataclasses.replace(value, **{field.name: _small_by_value(getattr(value, field.name))
                                             for field in dataclasses.fields(value) if field.init})
    return value


def _tensors(value: Any) -> Any:
    """`value` with every `_ByValue` a tensor again (the same dtype and values as in the worker)."""
    if isinstance(value, _ByValue):
        return torch.from_numpy(value.array)
    if isinstance(value, dict):
        return {key: _tensors(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_tensors(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{field.name: _tensors(getattr(value, field.name))
                                             for field in dataclasses.fields(value) if field.init})
    return value


def _ignore_stop_signals(worker: int) -> None:
    # A scheduler's SIGTERM or a terminal's Ctrl-C reaches the whole process group. The training process
    # finishes its step and saves; its DataLoader workers must not die under it meanwhile. They still end with
    # their parent (torch sets PR_SET_PDEATHSIG on them), and `_stop_live_loaders` stops them at its exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_LIVE_LOADERS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
"""DataLoader iterators whose worker processes may still run, and the process that started them."""


def _stop_live_loaders() -> None:
    # multiprocessing's exit handler stops daemonic children with SIGTERM, which loader workers ignore (above),
    # and then joins them: a process exiting with an unfinished stream would wait for ever. In a main process
    # that handler runs at exit, after torch's own atexit handler has turned `_shutdown_workers` into a no-op,
    # so this runs at exit before both (registered after torch's import); at the end of a multiprocessing child
    # the handler is called directly, running its finalizers first (the Finalize below). A loader worker forked
    # while another loader ran inherits this dict: only the process that started a loader stops it.
    for iterator, owner in list(_LIVE_LOADERS.items()):
        if owner == os.getpid():
            iterator._shutdown_workers()


atexit.register(_stop_live_loaders)
multiprocessing.util.Finalize(None, _stop_live_loaders, exitpriority=100)  # before the queues close (10)


def eval_batches(shard_dir: str | Path, cfg: DataConfig, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, preprocessors: dict[str, Preprocessor] | None = None) -> Iterator[Batch]:
    """Rank `rank`'s share of the shard set, in index order, unshuffled, the last partial batch kept.

    The shares are contiguous runs of samples in index order (`eval_share`), so every sample is in exactly one
    share, whatever the numbers of ranks and shards (a shard may be split between ranks), and the ranks' batches
    concatenated in rank order are one process's batches. With one rank: every sample once, in index order.
    """
    index = open_data(str(shard_dir), cfg)
    preprocessors = preprocessors or default_preprocessors(index, cfg)
    share = eval_share(index, rank, world_size)
    state = _WorkerState(cfg.on_corrupt, rank=rank)
    pipeline = wds.DataPipeline(
        _SlotShards(index, (tuple(share),), state),
        shard_samples(state.tar_error, _DeclaredMembers(index.members()), index.fields),
        _UnpackBlocks(index, state),
        _SamplesInShare(index, share),  # before decoding: a sample outside the share costs no decode
        wds.map(SampleDecoder(index, preprocessors, state)),
        wds.batched(batch_size, collation_fn=BatchCollator(index, preprocessors, state), partial=True),
    )
    return _worker_batches(pipeline)


class _SamplesInShare:
    """Pipeline stage: keeps the samples whose position within their shard is inside the rank's share.

    Positions count the samples as the tar reader yields them, the same on every rank, so the shares stay
    disjoint and complete even where a damaged shard yields fewer samples than its index entry says."""

    def __init__(self, index: ShardIndex, share: dict[str, tuple[int, int]]) -> None:
        self.bounds = {index.url(file): span for file, span in share.items()}

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        url, position = None, 0
        for sample in samples:
            if sample.get("__url__") != url:
                url, position = sample.get("__url__"), 0
            first, end = self.bounds.get(str(url), (0, 0))
            if first <= position < end:
                yield sample
            position += 1


def _pipeline(index: ShardIndex, cfg: DataConfig, preprocessors: dict[str, Preprocessor],
              slots: tuple[tuple[str, ...], ...],
              batch_size: int, *, stream: _StreamSeed | None) -> wds.DataPipeline:
    state = _WorkerState(cfg.on_corrupt, rank=stream.rank if stream is not None else 0)
    collate = BatchCollator(index, preprocessors, state)
    if stream is not None and cfg.classes_per_batch is not None:
        batch: Any = ClassBalancedBatches(cfg, collate, functools.partial(stream.rng, "classes"), state.slot)
    else:
        batch = wds.batched(batch_size, collation_fn=collate, partial=stream is None)
    return wds.DataPipeline(
        _SlotShards(index, slots, state, resample=stream if cfg.epoch_samples is not None else None),
        shard_samples(state.tar_error, _DeclaredMembers(index.members()), index.fields),
        _UnpackBlocks(index, state),  # before the shuffle buffer: a packed set is shuffled sample by sample
        functools.partial(stream.shuffle, cfg.shuffle_buffer) if stream and cfg.shuffle_buffer else None,
        wds.map(SampleDecoder(index, preprocessors, state, seed=stream.seed if stream else 0,
                              epoch=stream.epoch if stream else 0, train=stream is not None)),
        batch,
    )


def _take(open_pass: Callable[[int], Iterable[Batch]], count: int, skip: int, where: str, *,
          balanced: bool, first: Generator[Batch, None, None] | None = None) -> Iterator[Batch]:
    # Every rank must yield `count` batches (or collectives hang), but a pass over its shards can yield fewer:
    # corrupt samples are skipped, and P×K batching leaves classes short of K unused. A short rank streams its
    # shards again, each pass seeded by its number so that a top-up is not a repeat of the first batches.
    done, number = 0, 0
    while done < count:
        produced = 0
        opened = first if number == 0 and first is not None else _worker_batches(open_pass(number))
        with contextlib.closing(opened) as batches:
            for batch in batches:
                produced, done = produced + 1, done + 1
                if done > skip:
                    yield batch
                if done == count:
                    return
        if produced == 0:
            raise DataError(f"{where}: no full batch could be decoded; check the shards (see data.on_corrupt)")
        number += 1
        level, why = (logging.INFO, "classes short of K or corrupt samples") if balanced else \
            (logging.WARNING, "corrupt samples")  # expected every epoch with P×K batches, a bad sign otherwise
        log.log(level, "%s: %s left %d of %d batches this pass; streaming the shards again", where, why, done, count)


def _worker_batches(batches: Any) -> Generator[Batch, None, None]:
    # iter() here, not at the first next(): a DataLoader starts its workers (and their prefetching) right away.
    iterator = iter(batches)
    if hasattr(iterator, "_shutdown_workers"):
        _LIVE_LOADERS[iterator] = os.getpid()
    return _drain(iterator)


def _one_line(error: DataError) -> str:
    return str(error).strip().splitlines()[-1].partition("DataError: ")[2] or str(error)


def _drain(iterator: Any) -> Generator[Batch, None, None]:
    try:
        while True:
            try:
                batch = _tensors(next(iterator))
            except StopIteration:
                return
            except DataError as error:
                # A DataLoader worker's error arrives with its traceback inside the message: keep one line, and
                # raise outside this block so no traceback keeps the DataLoader (and its workers) alive.
                message = _one_line(error)
            else:
                yield batch
                continue
            raise DataError(message)
    finally:
        # Stop DataLoader workers now, also when the consumer stops early: an error raised from a worker sits
        # in a reference cycle with the DataLoader iterator, whose workers would otherwise live until a gc pass.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class _SlotShards:
    """First pipeline stage: the shard files of the DataLoader worker running it, as WebDataset URLs."""

    def __init__(self, index: ShardIndex, slots: tuple[tuple[str, ...], ...], state: _WorkerState, *,
                 resample: _StreamSeed | None = None) -> None:
        self.index, self.slots, self.state, self.resample = index, slots, state, resample

    def __call__(self) -> Iterator[dict[str, str]]:
        self.state.worker = _worker_id()
        if self.state.worker >= len(self.slots):
            raise DataError(f"DataLoader worker {self.state.worker} has no slot in a plan of {len(self.slots)}")
        self.state.shards = self.slots[self.state.worker]
        files = self.slots[self.state.worker]
        if self.resample is not None:
            # Resampled mode: shards drawn with replacement. A pass is bounded (`_take` opens the next, seeded by
            # its number, when a pass runs short), so a set whose every shard fails ends in an error, not a loop.
            rng, weights = self.resample.rng("shards"), [self.index.weights[file] for file in files]
            return ({"url": self.index.url(rng.choices(files, weights)[0])} for _ in range(4 * len(files) + 64))
        return iter([{"url": self.index.url(file)} for file in files])


@dataclass(frozen=True)
class _StreamSeed:
    """What the randomness of one pass of a training stream depends on; the DataLoader worker is added later."""

    seed: int
    epoch: int
    rank: int
    pass_index: int
    """The pass over the rank's shards this epoch: 0, then 1, 2, ... for top-ups (see `_take`)."""

    def rng(self, stage: str = "") -> random.Random:
        """A generator for one pipeline stage, seeded when the DataLoader worker running it starts iterating."""
        suffix = (f"/{stage}" if stage else "") + (f"/pass{self.pass_index}" if self.pass_index else "")
        return random.Random(f"twinscale/{self.seed}/{self.epoch}/{self.rank}/{_worker_id()}{suffix}")

    def torch_generator(self) -> torch.Generator:
        """The DataLoader's own generator (it seeds the loader workers' torch RNG), a function of this pass."""
        key = f"twinscale/{self.seed}/{self.epoch}/{self.rank}/pass{self.pass_index}/loader".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(), "little"))

    def shuffle(self, bufsize: int, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Shuffle buffer stage (bind `bufsize` with functools.partial), seeded when iteration starts."""
        return wds.shuffle(bufsize, initial=bufsize, rng=self.rng())(samples)


class _UnpackBlocks:
    """Pipeline stage of a packed set (index.pack > 1; trainer/data/packed.py): each block becomes its samples, in
    stored order, as `{"__key__", "__url__", "__block__", "__row__"}`; `SampleDecoder` reads them from the block.
    A corrupt block is skipped and counted (as one corrupt sample), or raises. Unpacked sets pass through."""

    def __init__(self, index: ShardIndex, state: _WorkerState) -> None:
        self.index, self.state = index, state

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.index.pack == 1:
            yield from samples
            return
        for raw in samples:
            try:
                block = read_block(self.index, raw)
            except Exception as error:  # any decoder failure is a corrupt block, never a crash of the stream
                if self.state.on_corrupt == "raise":
                    raise DataError(f"{raw.get('__url__')}: block {raw.get('__key__')}: {type(error).__name__}: "
                                    f"{error}; set data.on_corrupt=skip to skip corrupt samples") from None
                self.state.corrupt += 1
                continue
            url = raw.get("__url__")
            for row, key in enumerate(block.keys):
                yield {"__key__": key, "__url__": url, "__block__": block, "__row__": row}


class _DeclaredMembers:
    """select_files predicate: only members declared in index.json are read from the tar at all."""

    def __init__(self, members: set[str]) -> None:
        self.members = members

    def __call__(self, name: str) -> bool:
        return name.rsplit("/", 1)[-1].partition(".")[2].lower() in self.members


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


