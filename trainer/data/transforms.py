"""Images of any size → fixed-size model inputs: decode, augment (training) or resize + centre crop (evaluation),
normalise. Pillow and numpy only (torchvision does not load with this torch build).

`ImagePreprocessor` is the `Preprocessor` (trainer/data/preprocess.py) of an image view read by a tower that
resizes images (cnn or module towers with data.image.size, pretrained vision towers):

- decode: the header's size is checked against Pillow's decompression-bomb limit before any pixel is decoded;
  EXIF orientation is applied; JPEGs are decoded at a reduced scale (`Image.draft`) when the output is much
  smaller than the photo, which is where most of the time of a big photo goes;
- training: a random resized crop (area fraction in `crop_scale`, aspect ratio log-uniform in `crop_ratio`, as
  torchvision's RandomResizedCrop), a horizontal flip and optional colour jitter, all drawn from a numpy
  Generator seeded by blake2b(seed, epoch, sample key, view): the same sample gets the same view whatever the
  number of loader workers, and a resumed run replays it bitwise;
- evaluation/inference: the shorter side resized to `resize`, then the centre `size` × `size` crop, no
  randomness — a model trained on 224-px crops embeds a 1000-px photo as it saw it in evaluation;
- `collate`: uint8 rows → float32 [B, C, size, size], scaled to [0, 1] and normalised with mean/std, once per
  batch.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.data.preprocess import ImageSizeError, Preprocessor, SampleContext

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875
"""Default eval resize: the shorter side becomes size / 0.875 before the centre crop (224 → 256)."""
# Every decoder Pillow may use on a member: whatever its extension says, never the long list of all formats.
DECODERS = ("JPEG", "PNG", "WEBP")
# EXIF orientations that swap width and height (rotations by 90° or 270°, with or without a mirror).
TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
CROP_ATTEMPTS = 10


def default_resize(size: int) -> int:
    """The eval shorter side for a crop of `size`: round(size / 0.875)."""
    return max(size, int(round(size / EVAL_CROP_FRACTION)))


def channel_stats(values: tuple[float, ...] | list[float] | None, channels: int, default: tuple[float, ...],
                  name: str) -> tuple[float, ...]:
    """Per-channel mean or std for `channels` channels: `values` (1 value broadcast, or one per channel), else
    `default` (3 RGB values averaged for a gray image)."""
    chosen = tuple(float(v) for v in (values if values is not None else default))
    if len(chosen) == channels:
        return chosen
    if len(chosen) == 1:
        return chosen * channels
    if channels == 1 and values is None:
        return (float(np.mean(chosen)),)
    raise ValueError(f"data.image.{name}: {list(chosen)} has {len(chosen)} values for {channels}-channel images")


class ImagePreprocessor(Preprocessor):
    """An image view of any size → uint8 [C, size, size] rows → normalised float32 [B, C, size, size]."""

    def __init__(self, size: int, *, channels: int = 3, resize: int | None = None,
                 crop_scale: tuple[float, float] = (0.08, 1.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: bool = True, color_jitter: float = 0.0, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, view: str = "") -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.size, self.channels = int(size), int(channels)
        self.resize = int(resize) if resize is not None else default_resize(self.size)
        if self.resize < self.size:
            raise ValueError(f"resize {self.resize} is smaller than size {self.size}")
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.flip, self.color_jitter = bool(flip), float(color_jitter)
        self.mean = channel_stats(mean, self.channels, IMAGENET_MEAN, "mean")
        self.std = channel_stats(std, self.channels, IMAGENET_STD, "std")
        self.view = view
        """Part of the augmentation seed: the a and b views of one pair draw different crops."""

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of one model input."""
        return (self.channels, self.size, self.size)

    # --- Preprocessor contract ---

    def prepare(self, data: bytes, ext: str, context: SampleContext) -> np.ndarray:
        rng = self.sample_rng(context) if context.train else None
        with open_image(data) as image:
            pixels = self.transform(image, rng)
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    def collate(self, rows: list[Any]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(rows)).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return batch.sub_(mean).div_(std)

    def to_dict(self) -> dict[str, Any]:
        return {"name": "image", "size": self.size, "channels": self.channels, "resize": self.resize,
                "crop_scale": list(self.crop_scale), "crop_ratio": list(self.crop_ratio), "flip": self.flip,
                "color_jitter": self.color_jitter, "mean": list(self.mean), "std": list(self.std), "view": self.view}

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> ImagePreprocessor:
        """Inverse of `to_dict`."""
        return ImagePreprocessor(int(raw["size"]), channels=int(raw.get("channels", 3)), resize=raw.get("resize"),
                                 crop_scale=tuple(raw.get("crop_scale", (0.08, 1.0))),  # type: ignore[arg-type]
                                 crop_ratio=tuple(raw.get("crop_ratio", (3 / 4, 4 / 3))),  # type: ignore[arg-type]
                                 flip=bool(raw.get("flip", True)), color_jitter=float(raw.get("color_jitter", 0.0)),
                                 mean=tuple(raw["mean"]) if raw.get("mean") is not None else None,
                                 std=tuple(raw["std"]) if raw.get("std") is not None else None,
                                 view=str(raw.get("view", "")))

    # --- The transforms ---

    def sample_rng(self, context: SampleContext) -> np.random.Generator:
        """The augmentation stream of one sample: a function of (seed, epoch, key, view) only."""
        text = f"{context.seed}\x00{context.epoch}\x00{context.key}\x00{self.view}".encode()
        return np.random.default_rng(int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little"))

    def transform(self, image: Image.Image, rng: np.random.Generator | None) -> np.ndarray:
        """A decoded-lazily image → uint8 [size, size] or [size, size, 3]; `rng` None means evaluation."""
        width, height = oriented_size(image)
        if rng is None:
            scale = self.resize / min(width, height)
            crop_w, crop_h = self.size / scale, self.size / scale
            box = ((width - crop_w) / 2, (height - crop_h) / 2, (width + crop_w) / 2, (height + crop_h) / 2)
        else:
            box = random_crop_box(width, height, self.crop_scale, self.crop_ratio, rng)
        image = decode_oriented(image, self.channels, (box[2] - box[0]) / self.size, (box[3] - box[1]) / self.size)
        sx, sy = image.width / width, image.height / height  # a JPEG decoded at reduced scale
        out = image.resize((self.size, self.size), Image.Resampling.BILINEAR,
                           box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
        pixels = np.asarray(out)
        if rng is not None:
            if self.flip and rng.random() < 0.5:
                pixels = pixels[:, ::-1]
            if self.color_jitter > 0:
                pixels = jitter_colors(pixels, self.color_jitter, rng)
        return np.ascontiguousarray(pixels)


def open_image(data: bytes) -> Image.Image:
    """Open image bytes (JPEG, PNG or WebP) reading the header only; ImageSizeError above the bomb limit."""
    with warnings.catch_warnings():  # Pillow warns between its limit and twice it; refused just below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=DECODERS)
    width, height = image.size  # from the header: nothing is decoded yet
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise ImageSizeError(f"header size {height}x{width} exceeds the decompression-bomb limit of "
                             f"{Image.MAX_IMAGE_PIXELS} pixels")
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1: as stored)."""
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except (ValueError, TypeError, OSError):
        return 1


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied, from the header alone."""
    width, height = image.size
    return (height, width) if orientation(image) in TRANSPOSED_ORIENTATIONS else (width, height)


def decode_oriented(image: Image.Image, channels: int, shrink_x: float = 1.0, shrink_y: float = 1.0) -> Image.Image:
    """Decode `image` upright in mode L or RGB. A JPEG is decoded at 1/2, 1/4 or 1/8 scale when the output is
    smaller than the image by at least that factor along both axes (`shrink_*`: source pixels per output pixel)."""
    mode = "L" if channels == 1 else "RGB"
    shrink = min(shrink_x, shrink_y)
    if image.format == "JPEG" and shrink >= 2:
        width, height = image.size
        image.draft(mode, (math.ceil(width / shrink), math.ceil(height / shrink)))
    upright = (ImageOps.exif_transpose(image) or image) if orientation(image) != 1 else image
    if upright.mode == mode:
        return upright
    if upright.mode in ("RGBA", "LA", "PA") or (upright.mode == "P" and "transparency" in upright.info):
        # Transparent pixels over white, not over whatever colour they happen to store.
        rgba = upright.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert(mode)
    return upright.convert(mode)


def random_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                    rng: np.random.Generator) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom) in pixels, drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return (left, top, left + crop_w, top + crop_h)
    # Fallback: the centre crop of the whole image clamped to the ratio range.
    aspect = width / height
    if aspect < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return (left, top, left + crop_w, top + crop_h)


def jitter_colors(pixels: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation (RGB only) each scaled by a factor drawn from [1 − s, 1 + s]."""
    factors = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    work = pixels.astype(np.float32) * factors[0]
    gray = work if work.ndim == 2 else work @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    work = (work - gray.mean()) * factors[1] + gray.mean()
    if work.ndim == 3:
        gray = (work @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
        work = (work - gray) * factors[2] + gray
    return np.clip(np.rint(work), 0, 255).astype(np.uint8)
