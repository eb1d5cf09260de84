"""Preprocessing of one view: from a tar member's bytes to a model input, the same in training, evaluation,
`twinscale embed` and serving.

A `Preprocessor` is chosen per view by the model that reads it (`trainer.models.towers.build_preprocessors`): the
toy encoders keep today's decoding (npy arrays, images of the size index.json declares, hashed n-grams), while a
pretrained tower brings its own (a tokenizer, an image processor's size and mean/std). It runs in DataLoader
workers, so it must be picklable and cheap to copy; heavy state (a tokenizer) is loaded lazily per process.

Two steps, so that work per sample stays in the loader and work per batch happens once:
- `prepare(data, ext, context)`: one sample's member bytes → a plain row (numpy array, str, …). Raises any
  exception for undecodable bytes: the stream counts it as a corrupt sample.
- `collate(rows)`: the rows of a batch → the model input (a tensor, `TextBatch` or `TokenBatch`).

Randomness (train augmentation) must be a function of `context` only — (seed, epoch, sample key) — never of a
global RNG, the worker id or the number of workers, so exact resume stays bitwise.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.config import DataConfig
from trainer.data.formats import IMAGE_EXTS, ShardIndex, TextBatch, TokenBatch, ViewSpec, hash_ngrams

ModelInput = torch.Tensor | TextBatch | TokenBatch


@dataclass(frozen=True)
class SampleContext:
    """What a sample's preprocessing may depend on."""

    key: str
    """The sample's key in its shard (`__key__`)."""
    seed: int = 0
    """The run's seed."""
    epoch: int = 0
    """Training epoch (0 in evaluation)."""
    train: bool = False
    """Training (augment) or evaluation/inference (deterministic)."""


class Preprocessor:
    """Base of a view's preprocessing; see the module docstring for the contract."""

    def prepare(self, data: bytes, ext: str, context: SampleContext) -> Any:
        """One member's bytes → a row; raise on undecodable bytes."""
        raise NotImplementedError

    def collate(self, rows: list[Any]) -> ModelInput:
        """A batch of rows → the model input."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, stored with an exported model so inference preprocesses exactly as training."""
        raise NotImplementedError


class ArrayPreprocessor(Preprocessor):
    """`npy` members: float32 arrays of the shape index.json declares, stacked."""

    def __init__(self, shape: tuple[int, ...] | None = None) -> None:
        self.shape = tuple(shape) if shape is not None else None

    def prepare(self, data: bytes, ext: str, context: SampleContext) -> np.ndarray:
        array = decode_npy(data)
        if self.shape is not None and array.shape != self.shape:
            raise ValueError(f"shape {list(array.shape)} differs from index.json {list(self.shape)}")
        return array

    def collate(self, rows: list[Any]) -> torch.Tensor:
        return torch.from_numpy(np.stack(rows))

    def to_dict(self) -> dict[str, Any]:
        return {"name": "array", "shape": list(self.shape) if self.shape is not None else None}


class PixelPreprocessor(Preprocessor):
    """png/jpg members of the size index.json declares: float32 [C, H, W] in [0, 1], no augmentation."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = tuple(int(side) for side in shape)

    def prepare(self, data: bytes, ext: str, context: SampleContext) -> np.ndarray:
        # uint8 here, scaled to [0, 1] in `collate`: once per batch instead of per sample.
        return decode_pixels(data, self.shape[0], ext, size=self.shape[1:])

    def collate(self, rows: list[Any]) -> torch.Tensor:
        return torch.from_numpy(np.stack(rows).astype(np.float32) / np.float32(255))

    def to_dict(self) -> dict[str, Any]:
        return {"name": "pixels", "shape": list(self.shape)}


class HashedTextPreprocessor(Preprocessor):
    """txt members: hashed character n-gram ids for the n-gram bag encoder."""

    def __init__(self, buckets: int, ngrams: tuple[int, int]) -> None:
        self.buckets, self.ngrams = int(buckets), (int(ngrams[0]), int(ngrams[1]))

    def prepare(self, data: bytes, ext: str, context: SampleContext) -> np.ndarray:
        return self.encode(data.decode("utf-8"))

    def encode(self, text: str) -> np.ndarray:
        """One text's n-gram ids (also what `twinscale embed` uses for lines of a text file)."""
        return hash_ngrams(text, self.buckets, self.ngrams)

    def collate(self, rows: list[Any]) -> TextBatch:
        return TextBatch.collate(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"name": "hashed_text", "buckets": self.buckets, "ngrams": list(self.ngrams)}


def content_id(data: bytes) -> int:
    """A stable non-negative 63-bit id of an item's bytes: the same text or image in two tuples shares one."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def default_preprocessor(spec: ViewSpec, cfg: DataConfig) -> Preprocessor:
    """The toy encoders' preprocessing of a view: arrays, images of the declared size, hashed n-grams."""
    if spec.ext == "txt":
        return HashedTextPreprocessor(cfg.text_buckets, (cfg.text_ngrams[0], cfg.text_ngrams[1]))
    if spec.ext in IMAGE_EXTS:
        if spec.shape is None or len(spec.shape) != 3:
            raise ValueError(f"a {spec.ext} view without a [C, H, W] shape needs a model that resizes images")
        return PixelPreprocessor((spec.shape[0], spec.shape[1], spec.shape[2]))
    return ArrayPreprocessor(spec.shape)


def default_preprocessors(index: ShardIndex, cfg: DataConfig) -> dict[str, Preprocessor]:
    """`default_preprocessor` for every view of a shard set."""
    return {view: default_preprocessor(spec, cfg) for view, spec in index.views.items()}


def _image_from_dict(raw: dict[str, Any]) -> Preprocessor:
    from trainer.data.transforms import ImagePreprocessor  # late: transforms imports this module

    return ImagePreprocessor.from_dict(raw)


def _tokenizer_from_dict(raw: dict[str, Any]) -> Preprocessor:
    from trainer.data.tokenize import TokenizerPreprocessor  # late: tokenize imports this module

    return TokenizerPreprocessor.from_dict(raw)


# `to_dict()["name"]` → rebuild from that dict: how an exported model's preprocessing is restored for inference.
PREPROCESSOR_BUILDERS: dict[str, Callable[[dict[str, Any]], Preprocessor]] = {
    "array": lambda raw: ArrayPreprocessor(tuple(raw["shape"]) if raw.get("shape") is not None else None),
    "pixels": lambda raw: PixelPreprocessor(tuple(raw["shape"])),  # type: ignore[arg-type]
    "hashed_text": lambda raw: HashedTextPreprocessor(raw["buckets"], tuple(raw["ngrams"])),  # type: ignore[arg-type]
    "image": _image_from_dict,
    "tokenizer": _tokenizer_from_dict,
}


def preprocessor_from_dict(raw: dict[str, Any]) -> Preprocessor:
    """The preprocessor a `to_dict()` describes; ValueError for an unknown or malformed one."""
    builder = PREPROCESSOR_BUILDERS.get(str(raw.get("name")))
    if builder is None:
        raise ValueError(f"unknown preprocessor {raw.get('name')!r}; expected one of {sorted(PREPROCESSOR_BUILDERS)}")
    try:
        return builder(raw)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"preprocessor {raw.get('name')!r}: invalid description {raw} ({error})") from None


# --- Decoders shared by the preprocessors (and by tests that check them directly). ---

def decode_npy(data: bytes) -> np.ndarray:
    layout = _npy_layout(data[:_npy_header_end(data)]) if data[:6] == b"\x93NUMPY" else None
    if layout is None:
        array = np.load(io.BytesIO(data), allow_pickle=False)  # object arrays and pickles raise here
    else:  # the samples of a view share one header: numpy parses it once, the data is read in place
        dtype, shape, fortran, offset = layout
        count = int(np.prod(shape))
        if len(data) < offset + count * dtype.itemsize:  # np.load ignores trailing bytes too
            raise ValueError(f"{len(data) - offset} data bytes for shape {list(shape)} of {dtype}")
        array = np.frombuffer(data, dtype, count, offset).reshape(shape, order="F" if fortran else "C")
    real = np.issubdtype(array.dtype, np.number) and not np.issubdtype(array.dtype, np.complexfloating)
    if not isinstance(array, np.ndarray) or not (real or array.dtype == bool):
        raise ValueError(f"not a real numeric array ({getattr(array, 'dtype', type(array).__name__)})")
    return array.astype(np.float32)


def _npy_header_end(data: bytes) -> int:
    if data[6:7] == b"\x01":
        return 10 + int.from_bytes(data[8:10], "little")
    return 12 + int.from_bytes(data[8:12], "little") if data[6:7] in (b"\x02", b"\x03") else 0


@functools.lru_cache(maxsize=256)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int] | None:
    """dtype, shape, Fortran order and data offset of a .npy header, as numpy reads them (None: let np.load)."""
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            return None
        shape, fortran, dtype = read[version](stream)
    except ValueError:
        return None  # np.load reports what is wrong
    if dtype.hasobject or stream.tell() != len(header):
        return None  # object arrays: np.load(allow_pickle=False) raises
    return dtype, shape, fortran, len(header)


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """float32 [C, H, W] in [0, 1] from PNG or JPEG bytes."""
    return decode_pixels(data, channels).astype(np.float32) / np.float32(255)


# Pillow tries only these decoders, the declared one first: probing every registered format costs more than
# decoding a small image.
IMAGE_FORMATS = {"png": ("PNG", "JPEG"), "jpg": ("JPEG", "PNG"), "webp": ("WEBP", "JPEG", "PNG")}


class ImageSizeError(ValueError):
    """An image whose header declares a size other than expected, or more pixels than Pillow's bomb limit."""


def decode_pixels(data: bytes, channels: int, ext: str = "png", size: tuple[int, ...] | None = None) -> np.ndarray:
    """uint8 [C, H, W] from PNG or JPEG bytes.

    The size in the image's header is checked before any pixel is decoded: against `size` (H, W) when given
    (the shape index.json declares), and against `Image.MAX_IMAGE_PIXELS` always. A few hundred bytes can declare
    gigapixels (a decompression bomb); Pillow itself only warns below twice that limit, and would decode."""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS.get(ext, IMAGE_FORMATS["png"])) as image:
        width, height = image.size  # read from the header by open(); nothing is decoded yet
        if size is not None and (height, width) != tuple(size):
            raise ImageSizeError(f"header size {height}x{width} differs from index.json {size[0]}x{size[1]}")
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            raise ImageSizeError(f"header size {height}x{width} exceeds the decompression-bomb limit of "
                                 f"{Image.MAX_IMAGE_PIXELS} pixels")
        pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


