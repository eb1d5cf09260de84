"""ImagePreprocessor (trainer/data/transforms.py): eval resize + centre crop, seeded train augmentation, EXIF
orientation, the bomb check, normalisation, and the stream's guarantees with it (a sample's view does not depend on
the number of loader workers; a resumed epoch replays its batches bitwise)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import config
from trainer.data.preprocess import ImageSizeError, SampleContext, preprocessor_from_dict
from trainer.data.stream import train_batches
from trainer.data.transforms import ImagePreprocessor, random_crop_box
from trainer.data.writer import write_shards
from trainer.errors import ConfigError


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB photo-like image (gradients + blobs): resampling it at another scale changes little."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    channels = []
    for _ in range(3):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.2, 0.5) * min(width, height)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        channels.append(255 * (0.3 * x / width + 0.2 * y / height + 0.5 * blob))
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


EVAL = SampleContext("k", seed=0, epoch=0, train=False)


def test_eval_resizes_the_shorter_side_then_crops_the_centre() -> None:
    pre = ImagePreprocessor(32, resize=40)
    big = photo(1000, 750)
    out = pre.prepare(encode(big), "png", EVAL)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    # By hand: shorter side 750 → 40 (longer 1000 → 53.3), centre 32×32 of that.
    scaled = big.resize((round(1000 * 40 / 750), 40), Image.Resampling.BILINEAR)
    left, top = (scaled.width - 32) // 2, (scaled.height - 32) // 2
    manual = np.asarray(scaled.crop((left, top, left + 32, top + 32))).transpose(2, 0, 1)
    assert np.abs(out.astype(int) - manual.astype(int)).mean() < 4
    # A 1000-px photo and the same photo at 200 px give the same model input (what embed relies on) ...
    small = pre.prepare(encode(big.resize((200, 150), Image.Resampling.LANCZOS)), "png", EVAL)
    assert np.abs(out.astype(int) - small.astype(int)).mean() < 3
    # ... unlike a centre crop without the resize, which sees a 32-px window of the big photo.
    naive = np.asarray(big.crop((484, 359, 516, 391))).transpose(2, 0, 1)
    assert np.abs(naive.astype(int) - small.astype(int)).mean() > 10
    assert np.array_equal(pre.prepare(encode(big), "png", EVAL), out)  # no randomness in evaluation


def test_jpeg_reduced_decoding_matches_full_decoding() -> None:
    big = photo(1200, 900, seed=1)
    data = encode(big, "JPEG", quality=95)
    pre = ImagePreprocessor(48)
    fast = pre.prepare(data, "jpg", EVAL)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    slow = pre.prepare(encode(Image.fromarray(full)), "png", EVAL)  # PNG: decoded at full scale
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 3


def test_train_views_are_a_function_of_seed_epoch_key_and_view() -> None:
    data = encode(photo(300, 200))
    pre = ImagePreprocessor(32, crop_scale=(0.2, 1.0), color_jitter=0.4)

    def view(key: str, seed: int = 0, epoch: int = 0, pre: ImagePreprocessor = pre) -> np.ndarray:
        return pre.prepare(data, "png", SampleContext(key, seed=seed, epoch=epoch, train=True))

    assert np.array_equal(view("a"), view("a"))
    assert not np.array_equal(view("a"), view("b"))
    assert not np.array_equal(view("a"), view("a", epoch=1))
    assert not np.array_equal(view("a"), view("a", seed=1))
    other_view = ImagePreprocessor(32, crop_scale=(0.2, 1.0), color_jitter=0.4, view="b")
    assert not np.array_equal(view("a"), view("a", pre=other_view))  # a pair's two sides draw their own crops
    assert not np.array_equal(view("a"), pre.prepare(data, "png", EVAL))


def test_flip_and_color_jitter() -> None:
    image = photo(64, 64)
    data = encode(image)
    plain = ImagePreprocessor(64, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
    flipping = ImagePreprocessor(64, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True)
    jitter = ImagePreprocessor(64, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, color_jitter=0.5)
    contexts = [SampleContext(str(i), train=True) for i in range(16)]
    full = np.asarray(image).transpose(2, 0, 1)
    assert all(np.array_equal(plain.prepare(data, "png", c), full) for c in contexts)
    flips = [np.array_equal(flipping.prepare(data, "png", c), full[:, :, ::-1]) for c in contexts]
    assert 3 <= sum(flips) <= 13  # about half, never all or none
    assert all(flips[i] or np.array_equal(flipping.prepare(data, "png", c), full) for i, c in enumerate(contexts))
    jittered = [jitter.prepare(data, "png", c) for c in contexts[:4]]
    assert all(np.abs(j.astype(int) - full.astype(int)).mean() > 1 for j in jittered)


def test_random_crop_boxes_respect_scale_and_ratio() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        left, top, right, bottom = random_crop_box(400, 300, (0.3, 0.6), (0.5, 2.0), rng)
        width, height = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 400 and bottom <= 300
        assert 0.29 <= width * height / (400 * 300) <= 0.61
        assert 0.49 <= width / height <= 2.05
    # Impossible ratios fall back to the centre crop clamped to the ratio range.
    assert random_crop_box(100, 10, (1.0, 1.0), (1.0, 1.0), rng) == (45, 0, 55, 10)


def test_exif_orientation_is_applied() -> None:
    image = photo(40, 20)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encode(image, "JPEG", quality=100, exif=exif.tobytes())
    pre = ImagePreprocessor(20, resize=20)
    out = pre.prepare(data, "jpg", EVAL)
    upright = np.asarray(image.transpose(Image.Transpose.ROTATE_270))  # portrait 20×40
    expected = upright[10:30].transpose(2, 0, 1)  # the centre 20×20
    assert out.shape == (3, 20, 20) and np.abs(out.astype(int) - expected.astype(int)).mean() < 6


def test_decompression_bomb_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(photo(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ImageSizeError, match="decompression-bomb"):
        ImagePreprocessor(16).prepare(data, "png", EVAL)
    with pytest.raises(Exception):  # noqa: B017 - any decoder error: the stream counts it as corrupt
        ImagePreprocessor(16).prepare(b"not an image", "png", EVAL)


def test_gray_images_transparency_and_webp() -> None:
    gray = ImagePreprocessor(8, channels=1)
    assert gray.prepare(encode(photo(30, 20).convert("L")), "png", EVAL).shape == (1, 8, 8)
    assert gray.mean == (pytest.approx(0.449),) and gray.std == (pytest.approx(0.226),)  # ImageNet's, averaged
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert ImagePreprocessor(8).prepare(encode(clear), "png", EVAL).min() == 255  # transparent → white
    assert ImagePreprocessor(8).prepare(encode(photo(30, 20), "WEBP"), "webp", EVAL).shape == (3, 8, 8)


def test_collate_normalises_and_round_trips_through_to_dict() -> None:
    pre = ImagePreprocessor(4, mean=(0.5,), std=(0.25,), color_jitter=0.1, crop_scale=(0.5, 1.0))
    rows = [np.full((3, 4, 4), 255, np.uint8), np.zeros((3, 4, 4), np.uint8)]
    batch = pre.collate(rows)
    assert batch.dtype == torch.float32 and batch.shape == (2, 3, 4, 4)
    assert torch.allclose(batch[0], torch.full((3, 4, 4), 2.0))
    assert torch.allclose(batch[1], torch.full((3, 4, 4), -2.0))
    again = preprocessor_from_dict(pre.to_dict())
    assert isinstance(again, ImagePreprocessor) and again.to_dict() == pre.to_dict()
    with pytest.raises(ValueError, match="unknown preprocessor"):
        preprocessor_from_dict({"name": "nope"})


def test_image_config_is_validated() -> None:
    cfg = config.load(None, ["data.image.size=32"])
    assert cfg.data.image.size == 32 and cfg.data.image.flip and cfg.data.image.crop_scale == (0.08, 1.0)
    bad = {"data.image.crop_scale=[0.5,0.2]": "crop_scale", "data.image.crop_ratio=[0,1]": "crop_ratio",
           "data.image.resize=16": "data.image.resize", "data.image.mean=[0.1,0.2]": "data.image.mean",
           "data.image.std=[0]": "data.image.std", "data.image.sizes=3": "unknown key",
           "data.image.color_jitter=1.5": "color_jitter"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            config.load(None, ["data.image.size=32", "data.image.mean=[0.5]", "data.image.std=[0.5]", override]
                        if "mean" not in override and "std" not in override else ["data.image.size=32", override])


# --- With the stream: views independent of the loader workers; an epoch resumed mid-way replays bitwise. ---

@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    sizes = [(37, 50), (64, 48), (80, 80), (45, 30), (120, 60), (33, 90)]
    for label in range(3):
        (root / "src" / f"c{label}").mkdir(parents=True)
        for i in range(8):
            width, height = sizes[(i + label) % len(sizes)]
            fmt, suffix = (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"))[i % 3]
            photo(width, height, seed=label * 10 + i).save(root / "src" / f"c{label}" / f"{i}{suffix}", format=fmt)
    write_shards(str(root / "src"), "labeled", root / "shards", samples_per_shard=6)
    return root / "shards"


def _views_by_key(shards: Path, workers: int, skip: int = 0) -> tuple[dict[str, torch.Tensor], list[dict]]:
    cfg = config.load(None, [f"data.train={shards}", "data.test=null", "data.batch_size=4", "data.shuffle_buffer=8",
                             f"data.loader_workers={workers}", "data.image.size=16"]).data
    pre = {"input": ImagePreprocessor(16, crop_scale=(0.3, 1.0), color_jitter=0.3, view="input")}
    batches = list(train_batches(shards, cfg, seed=3, epoch=1, rank=0, world_size=1, skip_batches=skip,
                                 preprocessors=pre))
    views = {key: batch["views"]["input"][i] for batch in batches for i, key in enumerate(batch["keys"])}
    return views, batches


def test_a_samples_view_does_not_depend_on_the_loader_workers(photo_shards: Path) -> None:
    one, _ = _views_by_key(photo_shards, 0)
    two, _ = _views_by_key(photo_shards, 2)
    common = set(one) & set(two)
    assert len(common) >= 12
    assert all(torch.equal(one[key], two[key]) for key in common)
    assert one[sorted(common)[0]].shape == (3, 16, 16)


def test_a_resumed_epoch_replays_its_image_batches_bitwise(photo_shards: Path) -> None:
    _, full = _views_by_key(photo_shards, 2)
    _, resumed = _views_by_key(photo_shards, 2, skip=2)
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["views"]["input"], b["views"]["input"])
