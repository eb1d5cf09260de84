"""Fashion-MNIST shards for the held-out-classes image recipe (configs/fashion_heldout.yaml).

    apt-get install -y dataset-fashion-mnist          # /usr/share/datasets/fashion-mnist/*-ubyte.gz
    python -m trainer.data.fashion_mnist --out data/fashion

Training shards hold the first six classes (T-shirt, trouser, pullover, dress, coat, sandal) from the IDX training
file; test shards hold the other four (shirt, sneaker, bag, ankle boot) from the IDX test file: the model is
evaluated on classes it never saw. Images are written as 28×28 grayscale PNGs (labeled shards, class ids kept).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

from trainer.data.formats import ViewSpec
from trainer.data.sources import Item, encode_png
from trainer.data.writer import check_target, staged_output, write_tuples
from trainer.errors import DataError

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
TRAIN_CLASSES = (0, 1, 2, 3, 4, 5)
TEST_CLASSES = (6, 7, 8, 9)


def read_idx(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and labels [N] from a pair of gzipped IDX files."""
    try:
        with gzip.open(images) as handle:
            raw = handle.read()
        pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(labels) as handle:
            classes = np.frombuffer(handle.read(), np.uint8, offset=8)
    except (OSError, ValueError) as error:
        raise DataError(f"{images}: not a readable Fashion-MNIST IDX file ({error}); install it with "
                        "`apt-get install -y dataset-fashion-mnist`") from None
    return pixels, classes.astype(np.int64)


def pick(labels: np.ndarray, classes: tuple[int, ...], per_class: int, seed: int) -> np.ndarray:
    """`per_class` seeded positions of each class in `classes`, in sorted order."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen))


def write_fashion(out: Path, *, source: Path = SOURCE, train_per_class: int = 500, test_per_class: int = 250,
                  samples_per_shard: int = 250, seed: int = 0, overwrite: bool = False) -> None:
    """Write out/train (classes 0–5) and out/test (classes 6–9) labeled PNG shards."""
    check_target(out, overwrite)
    splits = {"train": ("train", TRAIN_CLASSES, train_per_class), "test": ("t10k", TEST_CLASSES, test_per_class)}
    with staged_output(out) as staging:
        for split, (prefix, classes, per_class) in splits.items():
            pixels, labels = read_idx(source / f"{prefix}-images-idx3-ubyte.gz",
                                      source / f"{prefix}-labels-idx1-ubyte.gz")
            positions = pick(labels, classes, per_class, seed)
            tuples = ((f"{split}-{p:06d}", (Item("png", int(labels[p]), data=encode_png(pixels[p])),), None)
                      for p in positions)
            write_tuples(staging / split, "labeled", tuples, ViewSpec("png", (1, 28, 28)), labeled=True,
                         num_classes=len(classes), samples_per_shard=samples_per_shard, split=split,
                         source=f"fashion-mnist:{split}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/fashion"))
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=250)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    write_fashion(args.out, source=args.source, train_per_class=args.train_per_class,
                  test_per_class=args.test_per_class, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
