"""img2dataset-style WebDataset shards written with plain `tarfile`, as another tool would (not Twinscale's writer).

Each sample `NNNNNNNNN` has `jpg` (or `png` every third sample), `txt` (a caption), `json` ({"label", "caption"}),
and a `pth` member that a reader must never touch. Captions are words drawn from a per-class vocabulary plus
shared noise words, so a text model can learn the classes (and an untrained one does worse).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

from trainer.data.scan import scan

CLASSES = 8
NOISE = ["the", "a", "photo", "of", "image", "picture", "with", "and", "some", "view", "nice", "old"]


def caption(rng: random.Random, label: int) -> str:
    vocabulary = [f"w{label}x{i}" for i in range(6)]
    words = rng.sample(NOISE, 6) + rng.sample(vocabulary, 2)
    rng.shuffle(words)
    return " ".join(words)


def image_bytes(label: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12 + label, 10), (20 * label, 100, 200 - 20 * label)).save(out, format=fmt)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shards(directory: Path, shards: int = 4, per_shard: int = 40, seed: int = 0,
                             start: int = 0) -> list[Path]:
    """`{00000..(shards-1)}.tar` under `directory`; returns their paths. Labels cycle over CLASSES."""
    directory.mkdir(parents=True, exist_ok=True)
    rng, paths, number = random.Random(seed), [], start
    for shard in range(shards):
        path = directory / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(per_shard):
                key, label = f"{number:09d}", number % CLASSES
                text = caption(rng, label)
                fmt, ext = ("PNG", "png") if number % 3 == 2 else ("JPEG", "jpg")
                _add(tar, f"{key}.{ext}", image_bytes(label, fmt))
                _add(tar, f"{key}.txt", text.encode())
                _add(tar, f"{key}.json", json.dumps({"label": label, "caption": text, "key": key}).encode())
                _add(tar, f"{key}.pth", b"\x80\x04 not to be unpickled")
                number += 1
        paths.append(path)
    return paths


def write_scanned_set(directory: Path, shards: int = 4, per_shard: int = 40) -> Path:
    """`write_img2dataset_shards`, then `twinscale scan`'s index.json next to the shards (what a user would do)."""
    write_img2dataset_shards(directory, shards=shards, per_shard=per_shard)
    scan(f"{directory}/{{00000..{shards - 1:05d}}}.tar", str(directory / "index.json"))
    return directory
