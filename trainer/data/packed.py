"""Packed shards: many small samples per tar sample, so that per-sample tar parsing stops dominating the stream.

    twinscale shards digits --kind labeled --out data/digits-packed --test-fraction 0.4 --pack 128

With `--pack N`, each tar sample of a shard is a block of up to N consecutive samples (the last block of a shard
may hold fewer). index.json records `"pack": N`; its counts stay in samples, so epoch plans, equal batch counts
per rank and exact resume do not change. The members of a block (key `block-NNNNNN`):

    keys.txt               the samples' keys, one per line
    <view>.npy             npy views: the samples' arrays stacked, [n, *shape], in their stored dtype
    <view>.txt             txt views: the texts' UTF-8 bytes concatenated, with
    <view>.len.npy         int64 [n]: each text's length in bytes
    <view>.content.npy     int64 [n]: each item's content id (`content_id` of the bytes it would have unpacked)
    <cls member>.npy       int64 [n]: class ids (`cls.npy`, or `<view>.cls.npy` for pairs and triplets)
    similar.npy            uint8 [n]: the similar flag (pairs)

Every member is read with an explicit decoder (npy with allow_pickle=False, bytes); nothing is unpickled. The
stream unpacks a block right after the tar reader (`trainer.data.stream`), before the shuffle buffer, so samples
are shuffled one by one and batches equal those of the same samples written unpacked. Images are not packed:
their members are large enough that tar parsing does not dominate.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.data.formats import KIND_VIEWS, ShardIndex, cls_member
from trainer.errors import DataError

KEYS = "keys.txt"
PACKABLE = ("npy", "txt")


def block_members(index: ShardIndex) -> set[str]:
    """Tar member suffixes of one block of a packed set (the stream reads these, nothing else)."""
    names = {KEYS}
    for view, spec in index.views.items():
        names |= {f"{view}.npy"} if spec.ext == "npy" else {f"{view}.txt", f"{view}.len.npy"}
        names.add(f"{view}.content.npy")
        if index.labels:
            names.add(f"{cls_member(index.kind, view)}.npy")
    if index.kind == "pairs":
        names.add("similar.npy")
    return names


def pack_block(kind: str, samples: Sequence[tuple[str, tuple[Any, ...], bool | None]], labeled: bool,
               number: int) -> dict[str, bytes | str]:
    """The tar members of block `number`: `samples` are (key, items, similar) as the shard writer holds them."""
    from trainer.data.preprocess import content_id
    from trainer.data.sources import encode_npy

    keys = [key for key, _, _ in samples]
    if any("\n" in key for key in keys):
        raise DataError("--pack: sample keys must not contain line breaks")
    members: dict[str, bytes | str] = {"__key__": f"block-{number:06d}", KEYS: "\n".join(keys).encode("utf-8")}
    for position, view in enumerate(KIND_VIEWS[kind]):
        items = [items[position] for _, items, _ in samples]
        if any(item.ext != items[0].ext for item in items) or items[0].ext not in PACKABLE:
            raise DataError(f"--pack: view {view} holds {items[0].ext} items; only npy and txt views are packed "
                            f"(images keep one sample per tar sample: leave --pack out)")
        data = [item.read() for item in items]
        if items[0].ext == "npy":
            members[f"{view}.npy"] = encode_npy(_stack_canonical(view, data))
        else:
            members[f"{view}.txt"] = b"".join(data)
            members[f"{view}.len.npy"] = encode_npy(np.array([len(text) for text in data], np.int64))
        members[f"{view}.content.npy"] = encode_npy(np.array([content_id(item) for item in data], np.int64))
        if labeled:
            members[f"{cls_member(kind, view)}.npy"] = encode_npy(np.array([item.label for item in items], np.int64))
    if kind == "pairs":
        members["similar.npy"] = encode_npy(np.array([bool(similar) for _, _, similar in samples], np.uint8))
    return members


def _stack_canonical(view: str, data: list[bytes]) -> np.ndarray:
    # A row unpacks to `encode_npy(row)`: that must be the stored member itself, so that content ids and the
    # preprocessing of a packed set equal those of the same samples unpacked.
    from trainer.data.sources import encode_npy

    arrays = [np.load(io.BytesIO(item), allow_pickle=False) for item in data]
    first = arrays[0]
    for item, array in zip(data, arrays, strict=True):
        if array.shape != first.shape or array.dtype != first.dtype or encode_npy(array) != item:
            raise DataError(f"--pack: view {view} holds npy items of different shapes or dtypes, or not as np.save "
                            f"writes them ({list(array.shape)} {array.dtype} vs {list(first.shape)} {first.dtype})")
    return np.stack(arrays)


@dataclass
class Block:
    """One decoded block: its samples' keys and, per view, the stacked items and their per-sample fields."""

    keys: list[str]
    items: dict[str, np.ndarray | list[bytes]]
    """Per view: the stored array [n, *shape] (npy) or each text's bytes (txt)."""
    labels: dict[str, np.ndarray]
    content: dict[str, np.ndarray]
    similar: np.ndarray | None
    floats: dict[str, np.ndarray] = field(default_factory=dict)
    """Per npy view, the items as float32 (what `decode_npy` makes of each row), converted once per block."""

    def float32(self, view: str) -> np.ndarray:
        """The npy view's items as float32 [n, *shape], converted on first use."""
        if view not in self.floats:
            self.floats[view] = np.asarray(self.items[view]).astype(np.float32)
        return self.floats[view]


def read_block(index: ShardIndex, sample: dict[str, Any]) -> Block:
    """Decode one block (a raw tar sample of a packed set); ValueError names what is missing or inconsistent."""
    keys = _member(sample, KEYS).decode("utf-8").split("\n")
    count = len(keys)
    items: dict[str, np.ndarray | list[bytes]] = {}
    labels, content = {}, {}
    for view, spec in index.views.items():
        if spec.ext == "npy":
            array = _array(sample, f"{view}.npy", count)
            if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or \
                    np.issubdtype(array.dtype, np.complexfloating):
                raise ValueError(f"{view}.npy: not a real numeric array ({array.dtype})")
            items[view] = array
        else:
            items[view] = _texts(_member(sample, f"{view}.txt"), _array(sample, f"{view}.len.npy", count))
        content[view] = _array(sample, f"{view}.content.npy", count, np.int64)
        if index.labels:
            labels[view] = _array(sample, f"{cls_member(index.kind, view)}.npy", count, np.int64)
    similar = _array(sample, "similar.npy", count, np.uint8) if index.kind == "pairs" else None
    if similar is not None and not np.isin(similar, (0, 1)).all():
        raise ValueError("similar.npy: flags other than 1 or 0")
    return Block(keys, items, labels, content, similar)


def _member(sample: dict[str, Any], name: str) -> bytes:
    if name not in sample:
        raise ValueError(f"member {name} is missing")
    return sample[name]


def _array(sample: dict[str, Any], name: str, count: int, dtype: type | None = None) -> np.ndarray:
    array = _load_npy(_member(sample, name))
    if array.ndim == 0 or array.shape[0] != count:
        raise ValueError(f"{name}: {array.shape[0] if array.ndim else 0} rows for {count} keys")
    if dtype is not None and array.dtype != dtype:
        raise ValueError(f"{name}: dtype {array.dtype}, expected {np.dtype(dtype)}")
    return array


def _load_npy(data: bytes) -> np.ndarray:
    # np.load parses every header with ast.literal_eval; a block's headers repeat, so parse each once (cached).
    from trainer.data.preprocess import _npy_header_end, _npy_layout

    layout = _npy_layout(data[:_npy_header_end(data)]) if data[:6] == b"\x93NUMPY" else None
    if layout is None:
        return np.load(io.BytesIO(data), allow_pickle=False)  # object arrays and pickles raise here
    dtype, shape, fortran, offset = layout
    count = int(np.prod(shape))
    if len(data) < offset + count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes for shape {list(shape)} of {dtype}")
    return np.frombuffer(data, dtype, count, offset).reshape(shape, order="F" if fortran else "C")


def _texts(data: bytes, lengths: np.ndarray) -> list[bytes]:
    if lengths.dtype != np.int64 or (lengths < 0).any() or int(lengths.sum()) != len(data):
        raise ValueError(f"text lengths do not add up to the {len(data)} bytes of the texts")
    ends = np.cumsum(lengths).tolist()
    return [data[end - length:end] for end, length in zip(ends, lengths.tolist(), strict=True)]
