"""Search an index written by `twinscale index`, and decide whether two items are the same.

    twinscale search indexes/digits query.png --k 5            # an image query: the path of an existing image file
    twinscale search indexes/glyphs "LATIN CAPITAL LETTER A"  # a text query (text→image with a CLIP-style model)
    twinscale search indexes/docs --file queries.txt --json   # one JSON object per query
    twinscale verify runs/signatures a.png b.png               # same/different at the held-out threshold

A query goes through the tower that reads its modality; for a two-tower model whose towers read the same
modality, through the other tower than the corpus (query side a, corpus side b). Queries are preprocessed as the
model was trained (its exported preprocessing). From Python: `Searcher(index_dir).search(["…"], k=10)`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import DataError, UserError
from trainer.index import FAISS_FILE, ITEMS_FILE, decode_text, read_index_json

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VERIFICATION_FILE = "verification.json"
TEXT_WIDTH = 60


@dataclass(frozen=True)
class Hit:
    """One search result."""

    rank: int
    key: str
    score: float
    label: str | None = None
    text: str | None = None


def query_modality(query: str) -> str:
    """image when the query names an existing image file, else text."""
    return "image" if query.lower().endswith(IMAGE_EXTENSIONS) and Path(query).is_file() else "text"


def query_side(inputs: dict[str, Any], modality: str, corpus_side: str | None) -> str:
    """The tower a query of `modality` goes through (see the module docstring); DataError when none reads it."""
    if inputs.get("b") is None:
        if inputs["a"]["modality"] != modality:
            raise DataError(f"{modality} query: this model reads {inputs['a']['modality']} inputs only")
        return "a"
    reads = [side for side in ("a", "b") if inputs[side]["modality"] == modality]
    if not reads:
        raise DataError(f"{modality} query: this model's towers read {inputs['a']['modality']} and "
                        f"{inputs['b']['modality']} inputs")
    if len(reads) == 2 and corpus_side is not None:
        return "a" if corpus_side == "b" else "b"
    return reads[0]


class Encoder:
    """An exported model that embeds texts and image paths through a chosen tower, preprocessed as in training."""

    def __init__(self, model_path: Path) -> None:
        from trainer.embed import load_model

        self.model, self.document, self.cfg = load_model(model_path)
        self.inputs: dict[str, Any] = self.document["inputs"]

    def embed(self, queries: Sequence[str], side: str, batch_size: int = 64) -> np.ndarray:
        """float32 unit-length embeddings of texts or image paths (all of one modality) through `side`."""
        import torch

        from trainer.data.sources import IMAGE_SUFFIXES, Item
        from trainer.embed import embed_images, embed_texts, image_preprocessor
        from trainer.models.towers import InputSpec

        with torch.no_grad():
            if query_modality(queries[0]) == "text":
                return embed_texts(self.model, self.cfg, queries, side, batch_size).float().numpy()
            spec = InputSpec.from_dict(self.inputs[side] or self.inputs["a"])
            preprocessor = image_preprocessor(self.model, spec, side, None, Path(queries[0]))
            items = [Item(IMAGE_SUFFIXES[Path(q).suffix.lower()], path=Path(q)) for q in queries]
            return embed_images(self.model, preprocessor, items, queries, side, batch_size).float().numpy()


class Searcher:
    """An index directory loaded for search: its faiss index, items and model."""

    def __init__(self, index_dir: Path) -> None:
        import faiss

        self.document = read_index_json(index_dir)
        for name in (FAISS_FILE, ITEMS_FILE):
            if not (index_dir / name).is_file():
                raise UserError(f"{index_dir}: {name} is missing; rebuild the index with `twinscale index`")
        self.encoder = Encoder(_model_path(self.document["model"]))
        weights = self.encoder.document.get("weights_sha256")
        if weights != self.document["weights_sha256"]:
            raise UserError(f"{index_dir}: indexed with other weights than {self.document['model']} holds now; "
                            f"rebuild the index with `twinscale index`")
        self.index = faiss.read_index(str(index_dir / FAISS_FILE))
        space = faiss.ParameterSpace()
        for name, parameter in (("nprobe", "nprobe"), ("ef_search", "efSearch")):
            if name in self.document["index"]:  # as recorded in index.json (what `twinscale index` was asked for)
                space.set_index_parameter(self.index, parameter, int(self.document["index"][name]))
        with np.load(index_dir / ITEMS_FILE, allow_pickle=False) as items:
            self.items = {name: items[name] for name in items.files}

    def search(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """The k nearest items of each query (texts or image paths), best first."""
        if k < 1:
            raise UserError(f"--k {k}: must be ≥ 1")
        results: list[list[Hit]] = [[] for _ in queries]
        for modality in ("text", "image"):
            rows = [i for i, query in enumerate(queries) if query_modality(query) == modality]
            if not rows:
                continue
            side = self._side([queries[i] for i in rows], modality)
            vectors = self.encoder.embed([queries[i] for i in rows], side)
            scores, ids = self.index.search(np.ascontiguousarray(vectors), min(k, self.document["count"]))
            for row, row_scores, row_ids in zip(rows, scores, ids, strict=True):
                results[row] = [self._hit(rank, int(i), float(s))
                                for rank, (s, i) in enumerate(zip(row_scores, row_ids, strict=True), 1) if i >= 0]
        return results

    def _side(self, queries: Sequence[str], modality: str) -> str:
        try:
            return query_side(self.encoder.inputs, modality, self.document["side"])
        except DataError:
            missing = [query for query in queries if query.lower().endswith(IMAGE_EXTENSIONS)]
            if modality == "text" and missing:  # read as a text, meant as an image path
                raise DataError(f"{missing[0]}: no such image file") from None
            raise

    def _hit(self, rank: int, row: int, score: float) -> Hit:
        label = None
        if "labels" in self.items:
            value = int(self.items["labels"][row])
            names = self.items.get("label_names")
            label = str(names[value]) if names is not None and 0 <= value < len(names) else str(value)
        text = decode_text(self.items, row) if "text_offsets" in self.items else None
        return Hit(rank, str(self.items["keys"][row]), score, label, text)


def _model_path(model: str) -> Path:
    from trainer.data.remote import is_url

    if not is_url(model):
        if not (Path(model) / "config.json").is_file():
            raise UserError(f"{model}: the index's model is gone (no config.json); rebuild the index")
        return Path(model)
    from trainer.remote_runs import fetch_outputs

    return fetch_outputs(model.rsplit("/", 1)[0]) / "model" if model.endswith("/model") else fetch_outputs(model)


def read_queries(queries: Sequence[str], file: Path | None) -> list[str]:
    """The command line's queries and the lines of `file`; UserError when there are none or one is empty."""
    found = list(queries)
    if file is not None:
        try:
            found += [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--file {file}: cannot read it ({error})") from None
    if not found:
        raise UserError("search: give queries (texts or image paths) or --file FILE")
    if any(not query.strip() for query in found):
        raise UserError("search: an empty query; give a text or an image path")
    return found


def cmd_search(args: argparse.Namespace) -> int:
    """`twinscale search INDEX_DIR QUERY… [--file F] [--k K] [--json]`."""
    queries = read_queries(args.queries, args.file)
    searcher = Searcher(args.index_dir)
    for query, hits in zip(queries, searcher.search(queries, args.k), strict=True):
        if args.json:
            rows = [{name: value for name, value in asdict(hit).items() if value is not None} for hit in hits]
            print(json.dumps({"query": query, "results": rows}, ensure_ascii=False))
        else:
            print(format_hits(query, hits))
    return 0


def format_hits(query: str, hits: Sequence[Hit]) -> str:
    """A plain table of one query's results."""
    columns = ["rank", "key", "score"] + (["label"] if any(h.label is not None for h in hits) else [])
    columns += ["text"] if any(h.text is not None for h in hits) else []
    rows = [[str(h.rank), h.key, f"{h.score:.4f}", h.label or "", _short(h.text or "")] for h in hits]
    rows = [row[:3] + ([row[3]] if "label" in columns else []) + ([row[4]] if "text" in columns else [])
            for row in rows]
    widths = [max(len(name), *(len(row[i]) for row in rows)) if rows else len(name)
              for i, name in enumerate(columns)]
    header = "  ".join(name.ljust(w) for name, w in zip(columns, widths, strict=True)).rstrip()
    lines = [f"query: {_short(query)}", header]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TEXT_WIDTH else text[:TEXT_WIDTH - 1] + "…"


@dataclass(frozen=True)
class Threshold:
    """The cosine threshold a pair is decided with, and its held-out accuracy (None when given by the user)."""

    value: float
    accuracy: float | None = None
    pairs: int | None = None


def heldout_threshold(model_path: Path) -> Threshold:
    """The best-accuracy threshold on the run's held-out split, cached in RUN/verification.json with the export's
    weights hash (recomputed when the model changed)."""
    from trainer.embed import model_dir

    directory = model_dir(model_path)
    weights = json.loads((directory / "config.json").read_text()).get("weights_sha256")
    cache = directory.parent / VERIFICATION_FILE
    cached = _read_cache(cache)
    if cached is not None and cached.get("weights_sha256") == weights:
        return Threshold(float(cached["threshold"]), float(cached["accuracy"]), int(cached["pairs"]))
    threshold = compute_threshold(model_path)
    record = {"weights_sha256": weights, "threshold": threshold.value, "accuracy": threshold.accuracy,
              "pairs": threshold.pairs}
    try:
        temporary = cache.with_name(f".{cache.name}.tmp")
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(temporary, cache)
    except OSError:
        pass  # a read-only run directory: decide without caching
    return threshold


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cached if isinstance(cached, dict) and {"threshold", "accuracy", "pairs"} <= set(cached) else None


def compute_threshold(model_path: Path) -> Threshold:
    """Embed the run's held-out split with the exported preprocessing and choose the threshold on its pairs."""
    import torch

    from trainer.data.shardsets import open_data
    from trainer.embed import load_model, shard_preprocessors
    from trainer.engine.evaluate import embed_split
    from trainer.verification import heldout_pairs

    model, _, cfg = load_model(model_path)
    target = cfg.data.test
    if target is None:
        raise UserError(f"{model_path}: the run has no held-out split (data.test); pass --threshold T")
    preprocessors = shard_preprocessors(model, cfg, open_data(target, cfg.data))
    pairs = heldout_pairs(embed_split(model, target, cfg, torch.device("cpu"), preprocessors=preprocessors))
    if pairs is None:
        raise UserError(f"{target}: the held-out split has no same and different pairs; pass --threshold T")
    return Threshold(pairs.threshold, pairs.accuracy, len(pairs.scores))


def cmd_verify(args: argparse.Namespace) -> int:
    """`twinscale verify RUN A B [--threshold T] [--json]`: A through side a, B through side b."""
    model_path = _local_run(args.model)
    for item in (args.a, args.b):
        if not item.strip():
            raise UserError("verify: an empty item; give a text or an image path")
    encoder = Encoder(model_path)
    vectors = [encoder.embed([item], _verify_side(encoder.inputs, item, side))[0]
               for item, side in ((args.a, "a"), (args.b, "b"))]
    score = float(np.dot(vectors[0], vectors[1]))
    threshold = Threshold(args.threshold) if args.threshold is not None else heldout_threshold(model_path)
    same = score >= threshold.value
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "same": same, "score": score, "threshold": threshold.value,
                          "heldout_accuracy": threshold.accuracy}, ensure_ascii=False))
    else:
        accuracy = "" if threshold.accuracy is None else (f" (held-out accuracy {threshold.accuracy:.3f} on "
                                                          f"{threshold.pairs} pairs)")
        print(f"{'same' if same else 'different'}: cosine {score:.4f}, threshold {threshold.value:.4f}{accuracy}")
    return 0


def _verify_side(inputs: dict[str, Any], item: str, side: str) -> str:
    modality = query_modality(item)
    reads = str((inputs.get(side) or inputs["a"])["modality"])
    if reads != modality:
        raise DataError(f"{item}: a {modality} item, but side {side} of this model reads {reads} inputs")
    return side


def _local_run(model: str) -> Path:
    from trainer.data.remote import is_url
    from trainer.embed import model_dir

    path = _model_path(model) if is_url(model) else Path(model)
    if not (model_dir(path) / "config.json").is_file():
        raise UserError(f"{model}: no exported model (expected a run directory with model/config.json)")
    return path
