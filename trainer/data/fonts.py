"""Glyph data from the fonts installed on this machine: character images across font families, and their names.

    apt-get install -y fonts-noto-core fonts-urw-base35 fonts-texgyre fonts-liberation2 fonts-freefont-ttf fonts-cmu
    python -m trainer.data.fonts --out data/glyphs

Every face (font file) that covers a character renders it once, black on white, centred. Families are split into
train and held-out *families* (near-clones — Nimbus, TeX Gyre, FreeFont, Liberation, URW — go to one side together,
so the held-out split really is unseen letterforms), and written as:

    OUT/images/{train,test}/U+0041/<face>.png     image folders, one class per character
    OUT/{train,test}.csv                           image,caption tables (caption: the character's Unicode name)
    OUT/labeled/{train,test}/                      labeled shards (class = character)
    OUT/captions/{train,test}/                     image–text pair shards (loss.name=clip)

Symbol and dingbat fonts are skipped; a face lacking a character (Pillow draws its .notdef box) is skipped for it.
Only recipes, tests and benchmarks use this; the trainer never depends on fonts.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from trainer.data.writer import write_shards
from trainer.errors import DataError

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path("/usr/share/texmf/fonts/opentype"))
LATIN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
GREEK = "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩαβγδεζηθικλμνξοπρστυφχψω"
CHARSETS = {"latin": LATIN, "latin+greek": LATIN + GREEK}
SKIPPED = ("symbol", "dingbat", "d050000l", "music", "math", "emoji")
# Metric clones of the same design sold under different names: they must not straddle the split.
CLONES = {
    "helvetica": ("nimbus sans", "tex gyre heros", "freesans", "liberation sans"),
    "times": ("nimbus roman", "tex gyre termes", "freeserif", "liberation serif"),
    "courier": ("nimbus mono", "tex gyre cursor", "freemono", "liberation mono"),
    "bookman": ("urw bookman", "tex gyre bonum"),
    "avant garde": ("urw gothic", "tex gyre adventor"),
    "century schoolbook": ("c059", "tex gyre schola"),
    "palatino": ("p052", "tex gyre pagella"),
    "zapf chancery": ("z003", "tex gyre chorus"),
    "computer modern": ("cmu ", "latin modern"),
    "dejavu": ("dejavu",),
    "noto sans": ("noto sans",),
    "noto serif": ("noto serif",),
}
MISSING = "\U0010fffd"  # a private-use code point no text font maps: renders as the face's .notdef glyph


def font_files(dirs: tuple[Path, ...] = FONT_DIRS) -> list[Path]:
    """TrueType/OpenType files under `dirs`, sorted."""
    return sorted(p for d in dirs if d.is_dir() for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))


def family_group(family: str) -> str:
    """The design a family belongs to: clones share one group, any other family is its own."""
    name = family.lower()
    return next((group for group, prefixes in CLONES.items() if name.startswith(prefixes)), name)


def render(font: ImageFont.FreeTypeFont, char: str, size: int) -> np.ndarray:
    """`char` in `font`, black on white, centred in a size × size grayscale image."""
    image = Image.new("L", (size, size), 255)
    ImageDraw.Draw(image).text((size / 2, size / 2), char, font=font, fill=0, anchor="mm")
    return np.asarray(image)


def glyphs(files: list[Path], chars: str, size: int) -> dict[str, dict[str, np.ndarray]]:
    """{face name: {char: pixels}} for every non-symbol face and every char it has."""
    faces: dict[str, dict[str, np.ndarray]] = {}
    for path in files:
        try:
            font = ImageFont.truetype(str(path), int(size * 0.7))
        except OSError:
            continue
        family, style = font.getname()
        if family is None or any(word in family.lower() for word in SKIPPED):
            continue
        tofu = render(font, MISSING, size)
        drawn = {}
        for char in chars:
            pixels = render(font, char, size)
            if pixels.min() < 128 and not np.array_equal(pixels, tofu):
                drawn[char] = pixels
        if drawn:
            faces[f"{family} {style or ''}".strip()] = drawn
    return faces


def split_groups(faces: dict[str, dict[str, np.ndarray]], test_fraction: float, seed: int) -> dict[str, str]:
    """{face: train|test}: whole design groups held out, chosen by a seeded hash of the group name."""
    groups = sorted({family_group(face) for face in faces})

    def draw(group: str) -> float:
        digest = hashlib.blake2b(f"{seed}/{group}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64

    held = {group for group in groups if draw(group) < test_fraction}
    if not held or len(held) == len(groups):
        raise DataError(f"{len(groups)} font design(s) found: too few to hold some out; install the fonts of "
                        f"this module's docstring")
    return {face: "test" if family_group(face) in held else "train" for face in faces}


def write_glyphs(out: Path, *, chars: str = LATIN, size: int = 32, test_fraction: float = 0.3, seed: int = 0,
                 files: list[Path] | None = None, samples_per_shard: int = 256) -> dict[str, int]:
    """Render, split by design, and write images, tables and shards under `out`; returns images per split."""
    faces = glyphs(files if files is not None else font_files(), chars, size)
    if not faces:
        raise DataError("no usable fonts found under " + ", ".join(map(str, FONT_DIRS)))
    sides = split_groups(faces, test_fraction, seed)
    counts = {"train": 0, "test": 0}
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for face, drawn in sorted(faces.items()):
        split = sides[face]
        for char, pixels in drawn.items():
            folder = out / "images" / split / f"U+{ord(char):04X}"
            folder.mkdir(parents=True, exist_ok=True)
            name = "".join(c if c.isalnum() else "_" for c in face) + ".png"
            Image.fromarray(pixels).save(folder / name)
            rows[split].append((str((folder / name).relative_to(out)), unicodedata.name(char).lower()))
            counts[split] += 1
    for split, table in rows.items():
        with (out / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "caption"])
            writer.writerows(table)
        write_shards(str(out / "images" / split), "labeled", out / "labeled" / split, seed=seed,
                     samples_per_shard=samples_per_shard, overwrite=True)
        write_shards(str(out / f"{split}.csv"), "pairs", out / "captions" / split, seed=seed,
                     samples_per_shard=samples_per_shard, overwrite=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.data.fonts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chars", choices=sorted(CHARSETS), default="latin")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = write_glyphs(args.out, chars=CHARSETS[args.chars], size=args.size,
                              test_fraction=args.test_fraction, seed=args.seed)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {counts['train']} train and {counts['test']} held-out glyph images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
