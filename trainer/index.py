"""A corpus embedded part by part and a faiss index of it: what `twinscale index MODEL DATA --out DIR` writes.

The corpus (a shard set, an image folder root/<class>/*, a text file or a .jsonl file) is cut into parts: a shard
set into one contiguous run of samples per shard (`eval_batches`' shares), a file or folder into `part_size`
items. Each part is embedded by `embed_part` (in this process, or in a Ray task: launch/index_job.py) and written
atomically to DIR/parts/part-NNNNN.npz with what it was made from (model weights hash, data, side), so a rerun
skips finished parts and refuses to mix parts of another model or corpus. `build_index` then writes
DIR/index.faiss, DIR/items.npz (keys, labels, label names, texts) and, last, DIR/index.json: everything
`trainer/search.py` needs, without the run's config. No pickles: npz read with allow_pickle=False, JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import DataError, UserError

FORMAT_NAME = "twinscale-index"
FORMAT_VERSION = 1
INDEX_JSON = "index.json"
FAISS_FILE = "index.faiss"
ITEMS_FILE = "items.npz"
PARTS_DIR = "parts"
OWN_ENTRIES = {INDEX_JSON, FAISS_FILE, ITEMS_FILE, PARTS_DIR}
EXT_MODALITY = {"png": "image", "jpg": "image", "webp": "image", "txt": "text", "npy": "vector"}
TRAIN_SAMPLE_SEED = 0
PROVENANCE_NAMES = {"weights_sha256": "model", "data": "corpus", "side": "--side", "parts": "--part-size",
                    "count": "corpus size", "views": "set of views", "overrides": "--set", "kind": "corpus kind"}


@dataclass(frozen=True)
class Corpus:
    """What is indexed and how it is cut: the provenance every part records."""

    data: str
    """The DATA argument (an absolute path for local files and folders)."""
    kind: str
    """shards, images, text or jsonl."""
    modality: str
    """image, text or vector: what the indexed items are."""
    side: str
    """The tower that embeds them (a or b)."""
    weights_sha256: str
    """The exported model's weights hash (its config.json)."""
    count: int
    """Items of a file or folder; samples of a shard set."""
    parts: int
    views: tuple[str, ...] = ()
    """Shard sets: the views indexed (keys `<sample key>/<view>`)."""
    overrides: tuple[str, ...] = ()

    def provenance(self) -> dict[str, Any]:
        """The JSON form parts and index.json record."""
        return {**asdict(self), "views": list(self.views), "overrides": list(self.overrides)}


@dataclass(frozen=True)
class CorpusItems:
    """The items of a file or folder corpus (shard sets are read by the parts themselves)."""

    keys: list[str]
    labels: list[int] | None = None
    texts: list[str] | None = None
    paths: list[str] | None = None
    label_names: list[str] | None = None


@dataclass(frozen=True)
class PartJob:
    """What embedding one part needs; sent as is to a Ray task."""

    model: str
    corpus: Corpus
    part: int
    batch_size: int
    keys: list[str] = field(default_factory=list)
    labels: list[int] | None = None
    texts: list[str] | None = None
    paths: list[str] | None = None
    first: int = 0


def corpus_kind(data: str) -> str:
    """shards, images, text or jsonl, from the DATA argument (DataError when it names nothing)."""
    from trainer.embed import is_shard_set

    if is_shard_set(data):
        return "shards"
    path = Path(data)
    if path.is_dir():
        return "images"
    if path.is_file():
        return "jsonl" if path.suffix.lower() == ".jsonl" else "text"
    raise DataError(f"{data}: no such shard set, image folder or text file")


def choose_side(document: dict[str, Any], modality: str, side: str | None, what: str) -> str:
    """The tower that reads `modality` items: `side` when given (checked), the only one that reads it, or b when
    both towers do (a two-tower model's document side; a Siamese model's when it was trained with a side b
    preprocessing of its own, e.g. a passage prompt). `document`: the export's config.json."""
    inputs = document["inputs"]
    if inputs.get("b") is None:
        reads = ["a", "b"] if inputs["a"]["modality"] == modality else []
    else:
        reads = [name for name in ("a", "b") if inputs[name]["modality"] == modality]
    if side is not None:
        if side not in reads:
            raise DataError(f"{what}: --side {side}: that tower reads {_side_modality(inputs, side)} inputs, not "
                            f"{modality}")
        return side
    if not reads:
        raise DataError(f"{what}: {modality} items, but this model's towers read {_modalities(inputs)}")
    if inputs.get("b") is None and "b" not in (document.get("preprocessing") or {}):
        return "a"
    return reads[-1]


def _side_modality(inputs: dict[str, Any], side: str) -> str:
    return str((inputs.get(side) or inputs["a"])["modality"])


def _modalities(inputs: dict[str, Any]) -> str:
    return " and ".join(sorted({spec["modality"] for spec in inputs.values() if spec}))


def read_items(corpus: Corpus) -> CorpusItems:
    """Keys, labels, texts or image paths of a file or folder corpus, in corpus order."""
    path = Path(corpus.data)
    if corpus.kind == "images":
        from trainer.data.sources import read_image_folder

        source = read_image_folder(path)
        items = [record[0] for record in source.records]
        classes = sorted(child.name for child in path.iterdir() if child.is_dir() and not child.name.startswith("."))
        return CorpusItems([str(item.path.relative_to(path)) for item in items if item.path],
                           [int(item.label or 0) for item in items], paths=[str(item.path) for item in items],
                           label_names=classes)
    if corpus.kind == "jsonl":
        from trainer.embed import read_jsonl

        texts, keys, labels, names = read_jsonl(path)
        return CorpusItems(keys, labels, texts=texts, label_names=names)
    from trainer.embed import read_lines

    lines = read_lines(path)
    return CorpusItems([f"{i:08d}" for i in range(len(lines))], texts=lines)


def part_jobs(model: str, corpus: Corpus, items: CorpusItems | None, part_size: int, batch_size: int,
              todo: Sequence[int]) -> list[PartJob]:
    """One job per part number in `todo`: its slice of the items (shard parts carry none)."""
    jobs = []
    for part in todo:
        if items is None:
            jobs.append(PartJob(model, corpus, part, batch_size))
            continue
        first, end = part * part_size, min((part + 1) * part_size, corpus.count)
        jobs.append(PartJob(model, corpus, part, batch_size, items.keys[first:end],
                            None if items.labels is None else items.labels[first:end],
                            None if items.texts is None else items.texts[first:end],
                            None if items.paths is None else items.paths[first:end], first))
    return jobs


@lru_cache(maxsize=2)
def _model(path: str) -> tuple[Any, dict[str, Any], Any]:
    from trainer.embed import load_model

    return load_model(Path(path))


def embed_part(job: PartJob) -> dict[str, np.ndarray]:
    """The arrays of one part: embeddings (float32), keys, labels when known, texts of a text corpus."""
    import torch

    from trainer.data.sources import IMAGE_SUFFIXES, Item
    from trainer.embed import embed_images, embed_shards, embed_texts, image_preprocessor, shard_set_config
    from trainer.models.towers import InputSpec

    model, document, cfg = _model(job.model)
    corpus = job.corpus
    labels: Sequence[int] | None = job.labels
    keys: Sequence[str] = job.keys
    if corpus.kind == "shards":
        shard_cfg = shard_set_config(cfg, corpus.data, corpus.overrides)
        side = None if model.is_siamese else corpus.side
        embeddings, labels, keys = embed_shards(model, shard_cfg, corpus.data, job.batch_size, job.part,
                                                corpus.parts, corpus.views, side)
    elif corpus.kind == "images":
        spec = InputSpec.from_dict(document["inputs"][corpus.side] or document["inputs"]["a"])
        preprocessor = image_preprocessor(model, spec, corpus.side, None, Path(corpus.data))
        items = [Item(IMAGE_SUFFIXES[Path(p).suffix.lower()], path=Path(p)) for p in job.paths or []]
        embeddings = embed_images(model, preprocessor, items, keys, corpus.side, job.batch_size)
    else:
        with torch.no_grad():
            embeddings = embed_texts(model, cfg, job.texts or [], corpus.side, job.batch_size, job.first)
    arrays = {"embeddings": embeddings.float().numpy(), "keys": np.array(list(keys), dtype=str)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    if job.texts is not None:
        arrays.update(encode_texts(job.texts))
    return arrays


def encode_texts(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Texts as one UTF-8 byte array and offsets (no fixed-width unicode arrays of the longest text)."""
    encoded = [text.encode("utf-8") for text in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(chunk) for chunk in encoded])
    return {"text_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8), "text_offsets": offsets}


def decode_text(arrays: Any, row: int) -> str:
    """Text `row` of arrays written by `encode_texts`."""
    offsets = arrays["text_offsets"]
    return bytes(arrays["text_bytes"][offsets[row]:offsets[row + 1]]).decode("utf-8")


def part_path(out: Path, part: int) -> Path:
    """Where part `part` of an index directory is written."""
    return out / PARTS_DIR / f"part-{part:05d}.npz"


def write_part(out: Path, part: int, arrays: dict[str, np.ndarray], corpus: Corpus) -> None:
    """Write one part atomically, with the corpus provenance it was made from."""
    path = part_path(out, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(temporary, meta=np.array(json.dumps(corpus.provenance(), sort_keys=True)), **arrays)  # type: ignore[arg-type]
    os.replace(temporary, path)


def finished_parts(out: Path, corpus: Corpus) -> set[int]:
    """Parts already written for this corpus; UserError when a part was made from another model or corpus."""
    found: set[int] = set()
    expected = corpus.provenance()
    for path in sorted((out / PARTS_DIR).glob("part-*.npz")):
        with np.load(path, allow_pickle=False) as arrays:
            recorded = json.loads(str(arrays["meta"]))
        if recorded != expected:
            changed = ", ".join(f"{PROVENANCE_NAMES.get(key, key)} ({key})" for key in expected
                                if recorded.get(key) != expected[key])
            raise UserError(f"{out}: its parts were embedded with another {changed} than this command's; give a "
                            f"new --out or delete {out}")
        found.add(int(path.stem.split("-")[1]))
    return found


def check_out_dir(out: Path) -> None:
    """Refuse an output directory that holds anything but an index of ours (or nothing)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if not out.exists():
        return
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in OWN_ENTRIES
                     and not entry.name.startswith("."))
    if foreign:
        raise UserError(f"--out {out}: holds {foreign[0]}, which is not part of a twinscale index; give a new or "
                        f"empty directory")
    if (out / INDEX_JSON).is_file():
        read_index_json(out)


def read_index_json(out: Path) -> dict[str, Any]:
    """index.json of an index directory, checked to be ours (UserError naming the directory otherwise)."""
    path = out / INDEX_JSON
    if not out.is_dir():
        raise UserError(f"{out}: no such index directory (write one with `twinscale index MODEL DATA --out DIR`)")
    if not path.is_file():
        raise UserError(f"{out}: not a twinscale index (no {INDEX_JSON}; write one with `twinscale index`)")
    try:
        document = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: not valid JSON") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: not a twinscale index (format {document.get('format')!r})")
    if document.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: index format version {document.get('format_version')}; this twinscale reads "
                        f"version {FORMAT_VERSION}: rebuild it with `twinscale index`")
    return document


def shard_parts(count_shards: int) -> int:
    """A shard set's parts: one per shard (at least one)."""
    return max(1, count_shards)


def file_parts(count: int, part_size: int) -> int:
    """A file or folder corpus's parts of `part_size` items."""
    if part_size < 1:
        raise UserError(f"--part-size {part_size}: must be ≥ 1")
    return max(1, math.ceil(count / part_size))


@dataclass(frozen=True)
class IndexSettings:
    """The faiss index to build and its search parameters."""

    type: str = "flat"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128


def read_parts(out: Path, parts: int) -> dict[str, np.ndarray]:
    """All parts of an index directory concatenated in part order."""
    columns: dict[str, list[np.ndarray]] = {}
    text_base = 0
    for part in range(parts):
        with np.load(part_path(out, part), allow_pickle=False) as arrays:
            for name in arrays.files:
                if name == "meta" or (name == "embeddings" and arrays[name].size == 0):
                    continue
                value = arrays[name]
                if name == "text_offsets":  # shift each part's offsets past the bytes before it
                    value = value[1:] + text_base if columns.get(name) else value + text_base
                    text_base = int(value[-1])
                columns.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in columns.items()}


def build_faiss(embeddings: np.ndarray, settings: IndexSettings) -> tuple[Any, dict[str, Any]]:
    """The faiss index of unit-length embeddings (inner product = cosine) and its parameters as recorded."""
    import faiss

    count, dim = embeddings.shape
    index: Any
    if settings.type == "flat":
        index = faiss.IndexFlatIP(dim)
        parameters: dict[str, Any] = {}
    elif settings.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = settings.ef_search
        parameters = {"hnsw_m": settings.hnsw_m, "ef_search": settings.ef_search}
    else:
        index, parameters = _trained_ivf(embeddings, settings)
    index.add(embeddings)
    return index, {"type": settings.type, **parameters}


def default_nlist(count: int) -> int:
    """About 4·√N clusters, at most N/39 so that k-means has the points per centroid faiss asks for."""
    return max(1, min(round(4 * math.sqrt(count)), count // 39))


def _trained_ivf(embeddings: np.ndarray, settings: IndexSettings) -> tuple[Any, dict[str, Any]]:
    import faiss

    count, dim = embeddings.shape
    nlist = settings.nlist or default_nlist(count)
    if not 1 <= nlist <= count:
        raise UserError(f"--nlist {nlist}: must be between 1 and the number of items ({count})")
    # k-means on a seeded sample: faiss uses at most 256 points per centroid anyway.
    rng = np.random.default_rng(TRAIN_SAMPLE_SEED)
    sample = embeddings[np.sort(rng.choice(count, size=min(count, 256 * nlist), replace=False))]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = TRAIN_SAMPLE_SEED
    index.train(sample)
    index.nprobe = min(settings.nprobe, nlist)
    return index, {"nlist": nlist, "nprobe": index.nprobe}


def write_index(out: Path, corpus: Corpus, settings: IndexSettings, model: str,
                label_names: list[str] | None) -> dict[str, Any]:
    """Build the faiss index of the finished parts and write index.faiss, items.npz and, last, index.json."""
    import faiss

    columns = read_parts(out, corpus.parts)
    # An index being rebuilt (another --index) is no index until its index.json is back: no old index.json may
    # describe a new index.faiss if this is interrupted between the files.
    (out / INDEX_JSON).unlink(missing_ok=True)
    embeddings = np.ascontiguousarray(columns.pop("embeddings", np.zeros((0, 0), np.float32)), dtype=np.float32)
    if len(embeddings) == 0:
        raise DataError(f"{corpus.data}: the corpus has no items to index")
    index, parameters = build_faiss(embeddings, settings)
    temporary = out / f".{FAISS_FILE}.tmp"
    faiss.write_index(index, str(temporary))
    os.replace(temporary, out / FAISS_FILE)
    if label_names is not None:
        columns["label_names"] = np.array(label_names, dtype=str)
    _write_npz(out / ITEMS_FILE, columns)
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": model,
                "weights_sha256": corpus.weights_sha256, "side": corpus.side, "modality": corpus.modality,
                "data": corpus.data, "count": int(len(embeddings)), "dim": int(embeddings.shape[1]),
                "index": parameters, "labels": "labels" in columns, "texts": "text_offsets" in columns,
                "corpus": corpus.provenance()}
    temporary = out / f".{INDEX_JSON}.tmp"
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, out / INDEX_JSON)
    return document


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    temporary = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(temporary, **arrays)  # type: ignore[arg-type]
    os.replace(temporary, path)
