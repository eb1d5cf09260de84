"""Shard formats shared by writers, the stream and the models: kinds, view names and the text batch type."""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.errors import DataError

# Views (tar member stems) of each shard kind, in the order they are stacked into one local batch.
KIND_VIEWS: dict[str, tuple[str, ...]] = {
    "labeled": ("input",),
    "pairs": ("a", "b"),
    "triplets": ("anchor", "positive", "negative"),
}


@dataclass
class TextBatch:
    """A batch of texts as hashed n-gram ids: the input of `torch.nn.EmbeddingBag` (ids + offsets)."""

    ids: torch.Tensor
    """All n-gram ids of the batch, concatenated (int64, 1-D)."""
    offsets: torch.Tensor
    """Start of each text in `ids` (int64, one per text)."""

    def __len__(self) -> int:
        return int(self.offsets.numel())

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(self.ids.to(device), self.offsets.to(device))

    def rows(self, start: int, stop: int) -> TextBatch:
        """Texts [start, stop) as a batch of their own."""
        begin = int(self.offsets[start]) if start < len(self) else int(self.ids.numel())
        end = int(self.offsets[stop]) if stop < len(self) else int(self.ids.numel())
        return TextBatch(self.ids[begin:end], self.offsets[start:stop] - begin)

    @staticmethod
    def collate(rows: list[np.ndarray]) -> TextBatch:
        lengths = [len(row) for row in rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ids = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        return TextBatch(torch.from_numpy(ids), torch.from_numpy(offsets))


@dataclass
class TokenBatch:
    """A batch of tokenized texts, padded to its longest text (dynamic padding): a transformer's input."""

    input_ids: torch.Tensor
    """Token ids (int64, [B, L])."""
    attention_mask: torch.Tensor
    """1 for a real token, 0 for padding (int64, [B, L])."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Texts [start, stop) as a batch of their own (trimmed to their own longest text)."""
        mask = self.attention_mask[start:stop]
        length = max(1, int(mask.sum(dim=1).max())) if len(mask) else 1
        return TokenBatch(self.input_ids[start:stop, :length], mask[:, :length])


def hash_ngrams(text: str, buckets: int, ngrams: tuple[int, int]) -> np.ndarray:
    """Character n-grams of `text` (padded with spaces) hashed into `buckets` ids, stable across processes.

    Uses crc32 rather than Python's `hash`, which is salted per process. An empty text yields one id (the
    padding), so every text has at least one n-gram for the embedding bag.
    """
    padded = f" {text.lower().strip()} "
    low, high = ngrams
    grams = [padded[i : i + n] for n in range(low, high + 1) for i in range(max(1, len(padded) - n + 1))]
    return np.fromiter((zlib.crc32(g.encode("utf-8")) % buckets for g in grams), dtype=np.int64, count=len(grams))


# --- Shard sets on disk: one directory holding index.json and shard-NNNNNN.tar files. ---

FORMAT_NAME = "twinscale-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SHARD_PATTERN = "shard-{:06d}.tar"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
VIEW_EXTS = ("npy", *IMAGE_EXTS, "txt")


def cls_member(kind: str, view: str) -> str:
    """Tar member suffix holding the class id of `view` (`cls` for labeled shards, `<view>.cls` otherwise)."""
    return "cls" if kind == "labeled" else f"{view}.cls"


@dataclass(frozen=True)
class ViewSpec:
    """How one view is stored: its member extension and the decoded shape (None for text)."""

    ext: str
    """Member extension: npy, png, jpg or txt."""
    shape: tuple[int, ...] | None
    """Array shape for npy, [C, H, W] for images of one size ([C] or None: any size), None for text."""
    alternatives: tuple[str, ...] = ()
    """Other extensions a sample may store this view under (a foreign set's `jpg;png;webp`), tried after `ext`."""

    @property
    def exts(self) -> tuple[str, ...]:
        """Every extension of this view, in the order they are looked for."""
        return (self.ext, *self.alternatives)

    def to_json(self) -> dict[str, object]:
        raw: dict[str, object] = {"ext": self.ext, "shape": list(self.shape) if self.shape is not None else None}
        if self.alternatives:  # an image folder of mixed formats: each sample keeps its own extension
            raw["alternatives"] = list(self.alternatives)
        return raw


def view_member(sample: dict[str, Any], view: str, spec: ViewSpec) -> tuple[str, str]:
    """The member name holding `view` in a raw sample, and its actual extension (the first of `spec.exts` present;
    the declared one when none is, so that the caller reports it missing)."""
    for ext in spec.exts:
        if f"{view}.{ext}" in sample:
            return f"{view}.{ext}", ext
    return f"{view}.{spec.ext}", spec.ext


@dataclass(frozen=True)
class ShardInfo:
    """One tar file of a shard set and how many samples it holds."""

    file: str
    samples: int
    weight: float = 1.0
    """Relative chance of being drawn in resampled mode (multi-source mixing: the source's weight / its shards)."""


@dataclass(frozen=True)
class ShardIndex:
    """The contents of index.json: what a shard set holds, so readers can plan without opening tar files."""

    kind: str
    """labeled, pairs or triplets."""
    views: dict[str, ViewSpec]
    """One spec per view of the kind (KIND_VIEWS order)."""
    labels: bool
    """Whether every view carries a class id member."""
    num_classes: int | None
    """Distinct class ids of the source (None without labels)."""
    shards: tuple[ShardInfo, ...]
    """Tar files in write order."""
    split: str | None = None
    """train, test or None when the source was not split."""
    source: str = ""
    """The SOURCE argument the shards were written from."""
    location: str = dataclasses.field(default="", compare=False)
    """Directory (path or URL) that relative shard files are in; set by the reader, never written (and not part
    of what an index says: the same set read from two places is the same index)."""
    fields: dict[str, str] | None = None
    """A foreign WebDataset set's field map (data.fields); None for a Twinscale set. The stream renames its
    members into Twinscale's (`trainer.data.shardsets.FieldMap`) right after reading them."""
    pack: int = 1
    """Samples per tar sample (`twinscale shards --pack N`): each tar sample is a block of up to `pack` samples
    (trainer/data/packed.py); shard counts stay in samples. 1: one sample per tar sample."""

    @property
    def num_samples(self) -> int:
        """Samples over all shards."""
        return sum(shard.samples for shard in self.shards)

    @property
    def weights(self) -> dict[str, float]:
        """Each shard file's resampling weight (ShardInfo.weight)."""
        return {shard.file: shard.weight for shard in self.shards}

    def url(self, file: str) -> str:
        """Where shard `file` is read from: a path or URL."""
        from trainer.data.remote import join

        return join(self.location, file) if self.location else file

    def members(self) -> set[str]:
        """Tar member suffixes a sample of this set declares (anything else is ignored, never decoded)."""
        if self.fields is not None:
            from trainer.data.shardsets import raw_members

            return raw_members(self.fields)
        if self.pack > 1:
            from trainer.data.packed import block_members

            return block_members(self)
        names = {f"{view}.{ext}" for view, spec in self.views.items() for ext in spec.exts}
        if self.labels:
            names |= {cls_member(self.kind, view) for view in self.views}
        if self.kind == "pairs":
            names.add("similar")
        return names

    def to_json(self) -> dict[str, object]:
        packing = {"pack": self.pack} if self.pack > 1 else {}  # unpacked sets keep their index.json unchanged
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "views": {view: spec.to_json() for view, spec in self.views.items()},
            "labels": self.labels,
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "shards": [{"file": shard.file, "samples": shard.samples} for shard in self.shards],
            "split": self.split,
            "source": self.source,
            **packing,
        }


def write_index(directory: Path, index: ShardIndex) -> Path:
    """Write `index` as `directory/index.json` and return its path."""
    path = Path(directory) / INDEX_FILE
    path.write_text(json.dumps(index.to_json(), indent=2) + "\n")
    return path


def read_index(directory: str | Path) -> ShardIndex:
    """Read and validate `directory/index.json`; DataError names the path and the problem."""
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise DataError(f"{path}: shard index not found; write shards with `twinscale shards SOURCE --out DIR`")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable JSON shard index ({error})") from None
    try:
        index = _parse_index(raw)
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path}: invalid shard index: {error}") from None
    missing = [shard.file for shard in index.shards if not (path.parent / shard.file).is_file()]
    if missing:
        raise DataError(f"{path}: lists {len(missing)} shard file(s) that are missing, e.g. {missing[0]}")
    return dataclasses.replace(index, location=str(directory))


def parse_index(raw: object, where: str, location: str) -> ShardIndex:
    """A Twinscale index from its parsed JSON (read from `where`, shards in `location`); DataError on a bad one."""
    try:
        return dataclasses.replace(_parse_index(raw), location=location)
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{where}: invalid shard index: {error}") from None


def _parse_index(raw: object) -> ShardIndex:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise ValueError(f'"format" must be "{FORMAT_NAME}"')
    if raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"version {raw.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    kind = raw["kind"]
    if kind not in KIND_VIEWS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KIND_VIEWS)}")
    views = {view: _parse_view(view, raw["views"][view]) for view in KIND_VIEWS[kind]}
    shards = tuple(_parse_shard(entry) for entry in raw["shards"])
    if not shards:
        raise ValueError("no shards listed")
    num_classes = raw.get("num_classes")
    if num_classes is not None:
        _expect(num_classes, int, "num_classes")
    pack = _expect(raw.get("pack", 1), int, "pack")
    if pack < 1 or (pack > 1 and any(spec.ext not in ("npy", "txt") for spec in views.values())):
        raise ValueError(f"pack {pack} must be ≥ 1, and > 1 only for npy and txt views")
    index = ShardIndex(kind=kind, views=views, labels=_expect(raw["labels"], bool, "labels"),
                       num_classes=num_classes, shards=shards, split=raw.get("split"),
                       source=str(raw.get("source", "")), pack=pack)
    if raw.get("num_samples") != index.num_samples:
        raise ValueError(f"num_samples {raw.get('num_samples')!r} != {index.num_samples}, the sum over shards")
    return index


def _parse_view(view: str, raw: dict[str, object]) -> ViewSpec:
    ext, shape = raw["ext"], raw.get("shape")
    if ext not in VIEW_EXTS:
        raise ValueError(f"view {view}: ext {ext!r} is not one of {', '.join(VIEW_EXTS)}")
    if ext == "txt":
        if shape is not None:
            raise ValueError(f"view {view}: a txt view has shape null")
        return ViewSpec("txt", None)
    alternatives: tuple[str, ...] = tuple(raw.get("alternatives") or ())  # type: ignore[arg-type]
    if alternatives and (ext not in IMAGE_EXTS or not set(alternatives) <= set(IMAGE_EXTS)):
        raise ValueError(f"view {view}: alternatives {list(alternatives)} must be image extensions of an image view")
    if ext in IMAGE_EXTS and shape is None:  # images of any size, channels unknown
        return ViewSpec(str(ext), None, alternatives)
    if not isinstance(shape, list) or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"view {view}: shape must be a list of positive ints, got {shape!r}")
    if ext in IMAGE_EXTS and (len(shape) not in (1, 3) or shape[0] not in (1, 3)):
        raise ValueError(f"view {view}: an image shape is [C, H, W] (one size), [C] or null (any size) with C 1 or 3, "
                         f"got {shape}")
    # Pillow's decompression-bomb limit, the one the stream's decoder checks each image header against.
    if ext in IMAGE_EXTS and len(shape) == 3 and Image.MAX_IMAGE_PIXELS is not None and \
            shape[1] * shape[2] > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"view {view}: image shape {shape} has more than {Image.MAX_IMAGE_PIXELS} pixels (Pillow's "
                         f"decompression-bomb limit)")
    return ViewSpec(str(ext), tuple(shape), alternatives)


def _parse_shard(raw: dict[str, object]) -> ShardInfo:
    file = _expect(raw["file"], str, "shards[].file")
    if "/" in file or file.startswith("."):
        raise ValueError(f"shard file {file!r} must be a plain file name in the index directory")
    samples = _expect(raw["samples"], int, "shards[].samples")
    if samples < 0:
        raise ValueError(f"shard {file}: negative sample count")
    return ShardInfo(file, samples)


def _expect(value: object, kind: type, name: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}")
    return value
