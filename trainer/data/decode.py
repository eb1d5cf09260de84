"""Decoding one raw tar sample and stacking samples into a batch (the last stages of the stream's pipeline).

`SampleDecoder` reads only the declared members of a sample through each view's Preprocessor (a corrupt sample
is skipped and counted, or raises, per data.on_corrupt); `BatchCollator` stacks decoded samples into the batch
schema documented in trainer/data/stream.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.data.formats import ShardIndex, cls_member, view_member
from trainer.data.packed import Block
from trainer.data.preprocess import ArrayPreprocessor, Preprocessor, SampleContext, content_id
from trainer.data.sources import encode_npy
from trainer.errors import DataError

Batch = dict[str, Any]


@dataclass
class _WorkerState:
    """Per-DataLoader-worker state shared by the stages of one pipeline copy."""

    on_corrupt: str
    worker: int = 0
    corrupt: int = 0
    rank: int = 0
    shards: tuple[str, ...] = ()

    def slot(self) -> str:
        """This worker's slot, for messages."""
        return f"{', '.join(self.shards)} (rank {self.rank}, loader worker {self.worker})"

    def tar_error(self, error: Exception) -> bool:
        """WebDataset handler for unreadable tar data: count and continue, or raise (no sleeping, unlike wds')."""
        if self.on_corrupt == "raise":
            url = next((a for a in reversed(error.args) if isinstance(a, str) and a.endswith(".tar")), "shard")
            raise DataError(f"{url}: unreadable tar data ({type(error).__name__}: {error.args[0] if error.args else ''}"
                            f"); set data.on_corrupt=skip to skip it") from None
        self.corrupt += 1
        return True


class CorruptSample(Exception):
    """A declared member that is missing or cannot be decoded."""


class SampleDecoder:
    """Decodes the declared members of one raw sample through each view's Preprocessor; a corrupt sample is
    skipped and counted, or raises."""

    def __init__(self, index: ShardIndex, preprocessors: dict[str, Preprocessor], state: _WorkerState, *,
                 seed: int = 0, epoch: int = 0, train: bool = False) -> None:
        self.index, self.preprocessors, self.state = index, preprocessors, state
        self.seed, self.epoch, self.train = seed, epoch, train

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.decode(sample)
        except CorruptSample as error:
            if self.state.on_corrupt == "raise":
                raise DataError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {error}; set "
                                f"data.on_corrupt=skip to skip corrupt samples") from None
            self.state.corrupt += 1
            return None  # wds.map drops None

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """{"__key__", "views": {view: row}, "labels": {view: int}, "similar": float (pairs)}."""
        if "__block__" in sample:
            return self.decode_packed(sample["__block__"], sample["__row__"])
        kind = self.index.kind
        context = SampleContext(str(sample["__key__"]), self.seed, self.epoch, self.train)
        views, content = {}, {}
        for view, spec in self.index.views.items():
            name, ext = view_member(sample, view, spec)  # a foreign set's view may be jpg or png, sample by sample
            data = _member(sample, name)
            views[view] = self.view(data, view, name, ext, context)
            # Content ids from the member's bytes, before any augmentation: two crops of one photo are one item.
            content[view] = content_id(data)
        labels = {view: _class_id(_member(sample, cls_member(kind, view))) for view in views} \
            if self.index.labels else {}
        decoded = {"__key__": sample["__key__"], "views": views, "labels": labels, "content": content}
        if kind == "pairs":
            decoded["similar"] = _similar(_member(sample, "similar"))
        return decoded

    def decode_packed(self, block: Block, row: int) -> dict[str, Any]:
        """`decode` of sample `row` of a packed block: the same result as its unpacked members would give."""
        key = block.keys[row]
        views = {view: self.packed_view(block, view, row) for view in self.index.views}
        labels = {view: int(block.labels[view][row]) for view in views} if self.index.labels else {}
        decoded: dict[str, Any] = {"__key__": key, "views": views, "labels": labels,
                                   "content": {view: int(block.content[view][row]) for view in views}}
        if block.similar is not None:
            decoded["similar"] = float(block.similar[row])
        return decoded

    def packed_view(self, block: Block, view: str, row: int) -> Any:
        """One view's row from a block: plain arrays straight from the block's float32 copy (what `decode_npy`
        makes of each row), anything else through the view's Preprocessor from the bytes the row unpacks to."""
        preprocessor, items = self.preprocessors[view], block.items[view]
        try:
            if type(preprocessor) is ArrayPreprocessor and not isinstance(items, list):
                rows = block.float32(view)
                if preprocessor.shape is not None and rows.shape[1:] != preprocessor.shape:
                    raise ValueError(f"shape {list(rows.shape[1:])} differs from index.json {list(preprocessor.shape)}")
                return rows[row]
            context = SampleContext(block.keys[row], self.seed, self.epoch, self.train)
            if isinstance(items, list):
                return preprocessor.prepare(items[row], "txt", context)
            return preprocessor.prepare(encode_npy(items[row]), "npy", context)
        except Exception as error:  # any decoder failure means a corrupt member, never a crash of the stream
            raise CorruptSample(f"{view}: cannot decode ({type(error).__name__}: {error})") from None

    def view(self, data: bytes, view: str, name: str, ext: str, context: SampleContext) -> Any:
        """One view's row, as its Preprocessor prepares it from the bytes of member `name`."""
        try:
            return self.preprocessors[view].prepare(data, ext, context)
        except Exception as error:  # any decoder failure means a corrupt member, never a crash of the stream
            raise CorruptSample(f"{name}: cannot decode ({type(error).__name__}: {error})") from None


def _member(sample: dict[str, Any], name: str) -> bytes:
    if name not in sample:
        raise CorruptSample(f"member {name} is missing")
    return sample[name]


def _class_id(data: bytes) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CorruptSample(f"class id {data[:20]!r} is not an integer") from None


def _similar(data: bytes) -> float:
    flag = data.strip()
    if flag not in (b"0", b"1"):
        raise CorruptSample(f"similar {data[:20]!r} is not 1 or 0")
    return float(flag == b"1")


class BatchCollator:
    """Stacks decoded samples into the batch schema of this module's docstring."""

    def __init__(self, index: ShardIndex, preprocessors: dict[str, Preprocessor], state: _WorkerState) -> None:
        self.index, self.preprocessors, self.state = index, preprocessors, state

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        views = {view: self.preprocessors[view].collate([s["views"][view] for s in samples])
                 for view in self.index.views}
        batch: Batch = {
            "views": views,
            "labels": {view: torch.tensor([s["labels"][view] for s in samples], dtype=torch.int64)
                       for view in views if self.index.labels},
            "content": {view: torch.tensor([s["content"][view] for s in samples], dtype=torch.int64)
                        for view in views},
            "keys": [s["__key__"] for s in samples],
            "corrupt": self.state.corrupt,
            "worker": self.state.worker,
        }
        if self.index.kind == "pairs":
            batch["similar"] = torch.tensor([s["similar"] for s in samples], dtype=torch.float32)
        return batch
