"""Previews of the few held-out items a gallery shows: a small PNG thumbnail for an image (or a square array) and
the text of a text item, read from the raw tar members of just those samples (nothing else is decoded).

Samples are counted in index order, as `eval_batches` yields them with one rank, so sample i here is row i of
`embed_split`'s embeddings.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.data.formats import IMAGE_EXTS, ShardIndex, view_member
from trainer.data.preprocess import decode_npy

THUMBNAIL_PX = 96
TEXT_CHARS = 300


@dataclass(frozen=True)
class Preview:
    """What a gallery shows of one item: its key and label, and a PNG thumbnail or a text."""

    key: str
    label: int | None = None
    png: bytes | None = None
    text: str | None = None


def raw_samples(index: ShardIndex, wanted: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The raw members of the samples at positions `wanted` (index order) of a shard set; packed sets: none.

    Only the shards holding a wanted sample are opened (their sample counts in the index say which), each read up
    to its last wanted sample."""
    from trainer.data.shardsets import shard_samples

    positions = sorted(set(wanted))
    if not positions or index.pack > 1:
        return {}
    members = index.members()
    stage = shard_samples(_reraise, lambda name: name.rsplit("/", 1)[-1].partition(".")[2].lower() in members,
                          index.fields)
    found: dict[int, dict[str, Any]] = {}
    start = 0
    for shard in index.shards:
        mine = [p - start for p in positions if start <= p < start + shard.samples]
        if mine:
            for offset, sample in enumerate(stage(iter([{"url": index.url(shard.file)}]))):
                if offset in mine:
                    found[start + offset] = sample
                if offset >= mine[-1]:
                    break
        start += shard.samples
    return found


def _reraise(error: Exception) -> bool:
    raise error


def preview(sample: dict[str, Any] | None, index: ShardIndex, view: str, label: int | None) -> Preview:
    """The preview of one view of a raw sample (a key alone when the sample or its member is missing)."""
    if sample is None:
        return Preview("?", label)
    key = str(sample.get("__key__", "?"))
    member, ext = view_member(sample, view, index.views[view])
    raw = sample.get(member)
    if not isinstance(raw, bytes):
        return Preview(key, label)
    try:
        if ext == "txt":
            return Preview(key, label, text=_shorten(raw.decode("utf-8", errors="replace")))
        if ext in IMAGE_EXTS:
            return Preview(key, label, png=image_thumbnail(raw))
        return Preview(key, label, **_array_preview(raw))
    except Exception as error:  # a member that does not decode: the gallery says so instead of failing
        return Preview(key, label, text=f"(cannot preview: {type(error).__name__})")


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"


def image_thumbnail(raw: bytes) -> bytes:
    """Encoded image bytes re-encoded as a PNG at most THUMBNAIL_PX on a side (small images scaled up, pixelated)."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        picture = image.convert("RGB")
    scale = THUMBNAIL_PX / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return _png(picture.resize(size, resample))


def _array_preview(raw: bytes) -> dict[str, Any]:
    """An .npy member: a grey image when it has an image's shape ([H, W], [C, H, W] or a square vector such as
    digits' 64 pixels), else a line giving its shape."""
    array = decode_npy(raw)  # the stream's own decoder: numeric arrays only, never a pickle
    grid = _as_grid(array)
    if grid is None:
        return {"text": f"array {list(array.shape)} {array.dtype}"}
    from PIL import Image

    low, high = float(grid.min()), float(grid.max())
    pixels = ((grid - low) / (high - low or 1.0) * 255).astype(np.uint8)
    return {"png": image_thumbnail(_png(Image.fromarray(pixels, "L")))}


def _as_grid(array: np.ndarray) -> np.ndarray | None:
    if array.ndim == 1 and array.size >= 16 and math.isqrt(array.size) ** 2 == array.size:
        side = math.isqrt(array.size)
        return array.reshape(side, side).astype(np.float64)
    if array.ndim == 2 and min(array.shape) >= 4:
        return array.astype(np.float64)
    if array.ndim == 3 and array.shape[0] in (1, 3) and min(array.shape[1:]) >= 4:
        return array.mean(axis=0).astype(np.float64)
    return None


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
