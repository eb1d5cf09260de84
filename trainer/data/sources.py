"""Readers that turn a SOURCE argument into records for the shard writer.

A SOURCE is `digits` (scikit-learn's 1,797 real 8x8 handwritten digits), an image folder
(`root/<class>/**/*.jpg|jpeg|png|webp`, of any sizes), a table (`.csv`, `.jsonl` or `.parquet`) of labeled texts,
pairs or triplets, or a `.npz` file of arrays. Tables hold labeled texts (`text,label`), pairs (`a,b,similar`, or
`anchor,positive`: similar pairs) or triplets (`anchor,positive,negative`), with optional `<column>_label` class
ids. Records hold encoded member bytes (npy/png/jpg/txt), never model code or pickles.
Tables of explicit pairs or triplets are read as a `Table`: row by row, each time it is iterated, never held whole
(a JSONL of ten million pairs streams in bounded memory); labeled sources are read whole, since sampling pairs and
a stratified split need every item.
Bad input raises `DataError` naming the file, column or line.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from trainer.data.formats import ViewSpec
from trainer.errors import DataError

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
IMAGE_DECODERS = ("JPEG", "PNG", "WEBP")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
# Column layouts of a text file, tried in this order; the first whose columns are all present wins:
# (form, the columns it needs, the columns holding its items). `anchor,positive` (sentence-transformers' and
# CLIP's layout) are similar pairs; `anchor,positive,negative` triplets, which can also be written as pairs.
# `image,caption` (or `image,text`) are image–text pairs: an image path (relative to the file) and its text.
TEXT_LAYOUTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("pairs", ("image", "caption"), ("image", "caption")),
    ("pairs", ("image", "text"), ("image", "text")),
    ("triplets", ("anchor", "positive", "negative"), ("anchor", "positive", "negative")),
    ("pairs", ("a", "b", "similar"), ("a", "b")),
    ("pairs", ("anchor", "positive"), ("anchor", "positive")),
    ("labeled", ("text", "label"), ("text",)),
)
TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes"}, {"0", "false", "no"}
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 4096
"""Rows decoded from a Parquet file at a time (its row groups are read one after another)."""


@dataclass(frozen=True)
class Item:
    """One input as tar member bytes (read lazily from `path` when `data` is None) and its class id."""

    ext: str
    label: int | None = None
    data: bytes | None = None
    path: Path | None = None

    def read(self) -> bytes:
        """The member bytes, read from disk if they are not held in memory."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        try:
            return self.path.read_bytes()
        except OSError as error:
            raise DataError(f"{self.path}: cannot read ({error.strerror})") from None


@dataclass
class Source:
    """Records read from a SOURCE: labeled items, or explicit pairs/triplets (one tuple of items per record)."""

    name: str
    """The SOURCE argument, recorded in index.json."""
    form: str
    """labeled, pairs or triplets: what each record is."""
    records: list[tuple[Item, ...]]
    """One tuple per record: (item,) for labeled; (a, b) or (anchor, positive, negative)."""
    spec: ViewSpec
    """Extension and shape shared by every item."""
    similar: list[bool] = field(default_factory=list)
    """Per record similarity flag (pairs only)."""
    view_specs: tuple[ViewSpec, ...] = ()
    """Per position of a record, where its items differ (image–text pairs: image, then text); empty: `spec`."""

    @property
    def labeled(self) -> bool:
        """Whether every item carries a class id."""
        return all(item.label is not None for record in self.records for item in record)

    def num_classes(self) -> int | None:
        """Distinct class ids over all items (None without labels)."""
        if not self.labeled:
            return None
        return len({item.label for record in self.records for item in record})


def read_source(source: str, *, as_images: bool = False) -> Source | Table:
    """Read SOURCE (digits, an image folder, .csv/.jsonl/.parquet tables, .npz arrays): records in memory, or a
    `Table` streamed row by row (explicit pairs/triplets)."""
    if source == "digits":
        return read_digits(as_images=as_images)
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: source not found; expected `digits`, an image folder, a .csv/.jsonl text "
                        f"file or a .npz array file")
    if path.is_dir():
        return read_image_folder(path)
    if as_images:
        raise DataError(f"{source}: as_images applies to `digits` only (an image folder is already images)")
    if path.suffix.lower() in TABLE_SUFFIXES:
        return read_table(path)
    readers: dict[str, Callable[[Path], Source]] = {".npz": read_npz}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{source}: unknown source type {path.suffix!r}; expected .csv, .jsonl, .parquet, .npz, an "
                        f"image folder or `digits`")
    return reader(path)


def read_digits(*, as_images: bool = False) -> Source:
    """scikit-learn's handwritten digits: float32 vectors in [0, 1] of shape [64], or 8x8 grayscale PNGs."""
    from sklearn.datasets import load_digits  # late: scikit-learn is only needed to write digits shards

    digits = load_digits()
    pixels, labels = digits.data.astype(np.float32), digits.target.astype(int)
    if as_images:
        grays = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
        items = [Item("png", int(y), data=encode_png(g)) for g, y in zip(grays, labels, strict=True)]
        return Source("digits", "labeled", [(item,) for item in items], ViewSpec("png", (1, 8, 8)))
    vectors = pixels / 16.0
    items = [Item("npy", int(y), data=encode_npy(v)) for v, y in zip(vectors, labels, strict=True)]
    return Source("digits", "labeled", [(item,) for item in items], ViewSpec("npy", (64,)))


def read_npz(path: Path) -> Source:
    """A .npz file with a float array `inputs` (or `x`, `embeddings`) [N, ...] and int `labels` (or `y`) [N]."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            inputs = _pick_array(arrays, path, ("inputs", "x", "embeddings"))
            labels = _pick_array(arrays, path, ("labels", "y"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz file without pickles ({error})") from None
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(inputs),):
        raise DataError(f"{path}: labels must be integers of shape [{len(inputs)}], got {labels.dtype} "
                        f"{list(labels.shape)}")
    if not np.issubdtype(inputs.dtype, np.number) or len(inputs) == 0:
        raise DataError(f"{path}: inputs must be a non-empty numeric array, got {inputs.dtype} {list(inputs.shape)}")
    vectors = inputs.astype(np.float32)
    items = [Item("npy", int(y), data=encode_npy(v)) for v, y in zip(vectors, labels, strict=True)]
    return Source(str(path), "labeled", [(item,) for item in items], ViewSpec("npy", tuple(vectors.shape[1:])))


def _pick_array(arrays: np.lib.npyio.NpzFile, path: Path, names: tuple[str, ...]) -> np.ndarray:
    for name in names:
        if name in arrays.files:
            return arrays[name]
    raise DataError(f"{path}: no array named {' or '.join(names)} (found: {', '.join(arrays.files) or 'none'})")


def read_image_folder(root: Path) -> Source:
    """Images under `root/<class>/` (any depth below the class folder): class ids are the sorted class folder
    names' positions; every image keeps its original bytes and extension (jpg, png, webp mixed), read from disk
    only when its shard is written.

    Every header is read once (no pixels): an unreadable image fails here, naming its path. Images that all share
    one size (and no EXIF rotation) are declared [C, H, W], as before; otherwise the view is declared [C] (any
    size), which a tower that resizes reads (data.image.size, trainer/data/transforms.py)."""
    classes = sorted(child for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))
    files = [(path, label) for label, folder in enumerate(classes) for path in _image_files(folder)]
    if not files:
        raise DataError(f"{root}: no images found; expected {root}/<class>/*.{'|'.join(sorted(IMAGE_SUFFIXES)[::-1])}")
    counts = Counter(IMAGE_SUFFIXES[path.suffix.lower()] for path, _ in files)
    exts = sorted(counts, key=lambda ext: (-counts[ext], ext))  # the most common first, the others as alternatives
    shape = _image_folder_shape([path for path, _ in files])
    items = [Item(IMAGE_SUFFIXES[path.suffix.lower()], label, path=path) for path, label in files]
    return Source(str(root), "labeled", [(item,) for item in items], ViewSpec(exts[0], shape, tuple(exts[1:])))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _image_folder_shape(paths: list[Path]) -> tuple[int, ...]:
    """[C, H, W] when every image has one size and no EXIF rotation, else [C]; C is 1 when all are gray."""
    headers = [_image_header(path) for path in paths]
    channels = 1 if all(mode in GRAY_MODES for _, _, mode, _ in headers) else 3
    sizes = {(height, width) for width, height, _, _ in headers}
    if len(sizes) == 1 and not any(rotated for *_, rotated in headers):
        return (channels, *sizes.pop())
    return (channels,)


def _image_header(path: Path) -> tuple[int, int, str, bool]:
    """Width, height, mode and whether EXIF asks for a rotation, from the header (nothing decoded)."""
    try:
        with Image.open(path, formats=IMAGE_DECODERS) as image:
            if Image.MAX_IMAGE_PIXELS is not None and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: {image.width}x{image.height} pixels exceed Pillow's decompression-bomb "
                                f"limit of {Image.MAX_IMAGE_PIXELS}")
            return image.width, image.height, image.mode, int(image.getexif().get(0x0112, 1) or 1) != 1
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: not a readable image ({error})") from None


def read_text_file(path: Path) -> Source:
    """A .csv or .jsonl file of labeled texts (text,label), pairs (a,b,similar or anchor,positive), triplets
    (anchor,positive,negative), or image–text pairs (image,caption or image,text; image paths relative to the
    file)."""
    rows = list(table_rows(path))
    if not rows:
        raise DataError(f"{path}: no records")
    columns = set(rows[0][1])
    layout = next((layout for layout in TEXT_LAYOUTS if set(layout[1]) <= columns), None)
    if layout is None:
        layouts = "; ".join(",".join(needed) for _, needed, _ in TEXT_LAYOUTS)
        raise DataError(f"{path}: missing columns: found {', '.join(sorted(columns))}; expected one of: {layouts}")
    form, needed, views = layout
    label_columns = _label_columns(path, form, views, columns)
    records, similar = [], []
    for line, row in rows:
        records.append(tuple(_image_item(path, line, row, view, label) if view == "image" else
                             _text_item(path, line, row, view, label) for view, label in label_columns))
        if form == "pairs":  # anchor,positive: every pair is similar
            similar.append(_flag(path, line, _field(path, line, row, "similar")) if "similar" in needed else True)
    if views[0] != "image":
        return Source(str(path), form, records, ViewSpec("txt", None), similar)
    images = [record[0] for record in records]
    counts = Counter(item.ext for item in images)
    exts = sorted(counts, key=lambda ext: (-counts[ext], ext))
    image_spec = ViewSpec(exts[0], _image_folder_shape([item.path for item in images if item.path]), tuple(exts[1:]))
    return Source(str(path), form, records, image_spec, similar, view_specs=(image_spec, ViewSpec("txt", None)))


def _label_columns(path: Path, form: str, views: tuple[str, ...], columns: set[str]) -> list[tuple[str, str | None]]:
    if form == "labeled":
        return [("text", "label")]
    wanted = [f"{view}_label" for view in views]
    present = [name for name in wanted if name in columns]
    if present and len(present) != len(wanted):
        raise DataError(f"{path}: has {', '.join(present)} but not {', '.join(sorted(set(wanted) - set(present)))};"
                        f" give a label column for every item or for none")
    return [(view, f"{view}_label" if present else None) for view in views]


def _text_item(path: Path, line: int, row: dict[str, object], column: str, label_column: str | None) -> Item:
    text = _field(path, line, row, column)
    if not isinstance(text, str):
        raise DataError(f"{path}:{line}: column {column!r} must be a text, got {text!r}")
    label = _integer(path, line, label_column, _field(path, line, row, label_column)) if label_column else None
    return Item("txt", label, data=text.encode("utf-8"))


def _image_item(path: Path, line: int, row: dict[str, object], column: str, label_column: str | None) -> Item:
    """An image named by a path relative to the table (or absolute); read when its shard is written."""
    name = _field(path, line, row, column)
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{path}:{line}: column {column!r} must be an image path, got {name!r}")
    image = (path.parent / name.strip()).resolve()
    ext = IMAGE_SUFFIXES.get(image.suffix.lower())
    if ext is None:
        raise DataError(f"{path}:{line}: {name}: not an image file name (expected "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    if not image.is_file():
        raise DataError(f"{path}:{line}: image {name} not found (paths are relative to {path.parent})")
    label = _integer(path, line, label_column, _field(path, line, row, label_column)) if label_column else None
    return Item(ext, label, path=image)


def _field(path: Path, line: int, row: dict[str, object], column: str) -> object:
    if column not in row:
        raise DataError(f"{path}:{line}: missing column {column!r}")
    return row[column]


def _integer(path: Path, line: int, column: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    raise DataError(f"{path}:{line}: column {column!r} must be an integer class id, got {value!r}")


def _flag(path: Path, line: int, value: object) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    word = str(value).strip().lower()
    if word in TRUE_WORDS | FALSE_WORDS:
        return word in TRUE_WORDS
    raise DataError(f"{path}:{line}: column 'similar' must be 1 or 0, got {value!r}")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                if None in row or any(value is None for value in row.values()):
                    raise DataError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames or [])} fields")
                yield reader.line_num, dict(row)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a readable UTF-8 CSV file ({error})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    """One JSON object per line, read line by line (never the whole file)."""
    number = 0
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):  # noqa: B007 (number names the failing line below)
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object per line")
                yield number, row
    except UnicodeDecodeError as error:
        raise DataError(f"{path}:{number}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})") from None


def _parquet_rows(path: Path, columns: Iterable[str] | None = None) -> Iterator[tuple[int, dict[str, object]]]:
    """The rows of a Parquet file (numbered from 1), streamed a batch of one row group at a time."""
    import pyarrow as pa  # late: only Parquet sources need it
    import pyarrow.parquet as pq

    number = 0
    try:
        with pq.ParquetFile(path) as table:
            wanted = None if columns is None else [name for name in table.schema_arrow.names if name in set(columns)]
            for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None


def table_rows(path: Path, columns: Iterable[str] | None = None) -> Iterator[tuple[int, dict[str, object]]]:
    """(line, row) of a .csv, .jsonl or .parquet table, streamed; Parquet's "line" is the row number from 1."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path, columns)
    return _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path)


def table_columns(path: Path) -> set[str]:
    """The columns of a table: Parquet's schema, else the first row's (a CSV header or the first JSON object)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return set(pq.read_schema(path).names)
        except (OSError, pa.ArrowException) as error:
            raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    rows = table_rows(path)
    first = next(rows, None)
    rows.close()  # type: ignore[attr-defined]
    if first is None:
        raise DataError(f"{path}: no records")
    return set(first[1])


def read_table(path: Path) -> Source | Table:
    """A table file: labeled texts (`text,label`) read whole into a Source; explicit pairs or triplets (every
    other layout) as a Table that streams its rows."""
    columns = table_columns(path)
    layout = next((layout for layout in TEXT_LAYOUTS if set(layout[1]) <= columns), None)
    if layout is None:
        layouts = "; ".join(",".join(needed) for _, needed, _ in TEXT_LAYOUTS)
        raise DataError(f"{path}: missing columns: found {', '.join(sorted(columns))}; expected one of: {layouts}")
    form, needed, views = layout
    if form == "labeled":
        return read_text_file(path)
    labels = tuple(_label_columns(path, form, views, columns))
    return Table(path, form, labels, "similar" in needed)


@dataclass(frozen=True)
class Table:
    """Explicit pairs or triplets in a table file (CSV, JSONL or Parquet), read row by row each time `records()`
    is iterated: memory stays O(one row), whatever the file's size."""

    path: Path
    form: str
    """pairs or triplets."""
    columns: tuple[tuple[str, str | None], ...]
    """Per item of a record: its column and its class id column (None without labels)."""
    flagged: bool
    """Whether a `similar` column gives each pair's flag (otherwise every pair is similar)."""

    @property
    def name(self) -> str:
        """The SOURCE argument, recorded in index.json."""
        return str(self.path)

    @property
    def labeled(self) -> bool:
        """Whether every item carries a class id."""
        return self.columns[0][1] is not None

    @property
    def images(self) -> bool:
        """Whether the first item of every record is an image (an `image,caption` table)."""
        return self.columns[0][0] == "image"

    def records(self) -> Iterator[tuple[bytes, tuple[Item, ...], bool | None]]:
        """(split key, items, similar flag) per row, in file order; the split key is the first column's value as
        written (an image path as given, not resolved), so a split does not depend on where the table lies."""
        needed = {name for pair in self.columns for name in pair if name} | ({"similar"} if self.flagged else set())
        for line, row in table_rows(self.path, needed):
            items = tuple(_image_item(self.path, line, row, view, label) if view == "image" else
                          _text_item(self.path, line, row, view, label) for view, label in self.columns)
            similar = None
            if self.form == "pairs":  # anchor,positive: every pair is similar
                similar = _flag(self.path, line, _field(self.path, line, row, "similar")) if self.flagged else True
            yield str(row[self.columns[0][0]]).encode("utf-8"), items, similar


class ImageSummary:
    """What a view's spec needs from many image headers, in O(1) memory: extensions, channels, sizes."""

    def __init__(self) -> None:
        self.exts: Counter[str] = Counter()
        self.sizes: set[tuple[int, int]] = set()
        self.gray, self.rotated = True, False

    def add(self, path: Path, ext: str) -> None:
        """Read one image's header (nothing decoded); an unreadable image raises DataError naming it."""
        width, height, mode, rotated = _image_header(path)
        self.exts[ext] += 1
        if len(self.sizes) < 2:
            self.sizes.add((height, width))
        self.gray, self.rotated = self.gray and mode in GRAY_MODES, self.rotated or rotated

    def merge(self, other: ImageSummary) -> None:
        """Fold in another summary (of another shard)."""
        self.exts.update(other.exts)
        self.sizes = set(sorted(self.sizes | other.sizes)[:2])  # two sizes already mean "any size"
        self.gray, self.rotated = self.gray and other.gray, self.rotated or other.rotated

    def spec(self) -> ViewSpec:
        """The most common extension first, the others as alternatives; [C, H, W] for one size, else [C]."""
        exts = sorted(self.exts, key=lambda ext: (-self.exts[ext], ext))
        channels = 1 if self.gray else 3
        shape = (channels, *next(iter(self.sizes))) if len(self.sizes) == 1 and not self.rotated else (channels,)
        return ViewSpec(exts[0], shape, tuple(exts[1:]))


def encode_npy(array: np.ndarray) -> bytes:
    """The .npy bytes of `array` (never pickled)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W] (grayscale) or [H, W, 3] (RGB) array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
