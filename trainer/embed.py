"""Inference with an exported model (run_dir/model): embed inputs to .npz, or evaluate on shards.

No DeepSpeed and no pickles: the model is rebuilt from config.json and loaded from safetensors.
Inputs: an image folder `root/<class>/*` (labels from folder names), a text file (one item per line), or a
shard set (every view of every sample; keys are `<sample key>/<view>`) named as data.train names one: a Twinscale
shard directory or its URL (`s3://bucket/digits/test`), or a WebDataset set — a brace pattern, glob or `::` list of
tar paths or URLs read through a field map (`data.fields`: the run's, or one given with `--set data.fields=…`).
A shard set is read as the run's data.test would be: `--set data.test_index=…` names its counts index.
`twinscale index` (trainer/index.py) embeds a corpus part by part with the pieces below: `embed_images` and
`embed_texts` on a slice of items, `embed_shards(part=, parts=)` on one contiguous run of a set, `read_jsonl`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import config
from trainer.config import Config
from trainer.data import remote
from trainer.data.formats import INDEX_FILE, KIND_VIEWS, ShardIndex
from trainer.data.preprocess import (
    HashedTextPreprocessor,
    PixelPreprocessor,
    Preprocessor,
    SampleContext,
    default_preprocessors,
)
from trainer.data.shardsets import is_pattern, open_data
from trainer.data.sources import Item, read_image_folder
from trainer.data.stream import eval_batches
from trainer.engine.evaluate import evaluate
from trainer.engine.step import TOWER_SIDE
from trainer.errors import DataError, UserError
from trainer.models.export import load_exported
from trainer.models.towers import EmbeddingModel, InputSpec

Rows = tuple[torch.Tensor, list[int] | None, list[str]]


def model_dir(path: Path) -> Path:
    """A run directory's model/ directory, or the path itself when it is one."""
    return path / "model" if (path / "model" / "config.json").is_file() else path


def run_config(path: Path, document: dict[str, Any]) -> Config:
    """The config of the run that exported the model (defaults with its text hashing when it is gone)."""
    saved = model_dir(path).parent / "config.yaml"
    if saved.is_file():
        return config.load(saved)
    extra = document.get("extra") or {}
    overrides = [f"data.{key}={value}" for key, value in extra.items() if key in ("text_buckets", "text_ngrams")]
    return config.load(None, overrides)


def load_model(model_path: Path) -> tuple[EmbeddingModel, dict[str, Any], Config]:
    """The exported model of a run (or model/ directory), its config.json and the run's config."""
    model, document = load_exported(model_dir(model_path))
    return model, document, run_config(model_path, document)


def is_shard_set(spec: str) -> bool:
    """Whether an input names shards (a URL, a pattern or list of tar files, a directory of shards) rather than
    an image folder or a text file."""
    if remote.is_url(spec) or is_pattern(spec):
        return True
    return (Path(spec) / INDEX_FILE).is_file() or (Path(spec).is_dir() and any(Path(spec).glob("*.tar")))


def shard_set_config(cfg: Config, spec: str, overrides: Sequence[str] = ()) -> Config:
    """The run's config reading the shard set `spec` as its data.test, with the user's `data.*` overrides.

    Field map: the one given (`--set data.fields=…`; `null` reads a Twinscale set), else the run's own when `spec`
    is a pattern or a directory without a Twinscale index (a set laid out like the run's training data), else none.
    Counts index: `data.test_index` when given, else index.json next to the shards."""
    given = {text.partition("=")[0].strip() for text in overrides}
    outside = sorted(key for key in given if not key.startswith("data."))
    if outside:
        raise UserError(f"--set {outside[0]}: only data.* keys apply here (e.g. data.fields, data.test_index)")
    if overrides:
        cfg = config.from_dict(config.apply_overrides(config.to_dict(cfg), list(overrides)), origin="--set")
    update: dict[str, Any] = {"test": spec}
    if "data.test_index" not in given:
        update["test_index"] = None  # the run's own test set's counts say nothing about another set
    if "data.fields" not in given and cfg.data.fields is not None and not is_pattern(spec) and _twinscale_set(spec):
        update["fields"] = None
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)})


def _twinscale_set(spec: str) -> bool:
    # A Twinscale index names its kind; a counts index written by `twinscale scan` does not.
    where = remote.join(spec, INDEX_FILE)
    try:
        return remote.exists(where) and "kind" in json.loads(remote.read_bytes(where))
    except (DataError, ValueError):
        return False


def embed_to_file(model_path: Path, input_path: str | Path, out: Path, side: str = "a", batch_size: int = 512,
                  overrides: Sequence[str] = ()) -> int:
    """Embed `input_path` and write `out` (.npz: embeddings, keys, labels when known); returns the count.

    `overrides`: `data.*` settings for a shard set input (see `shard_set_config`)."""
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: expected a .npz file name")
    model, document, cfg = load_model(model_path)
    spec = InputSpec.from_dict(document["inputs"][side] or document["inputs"]["a"])
    if is_shard_set(str(input_path)):
        cfg = shard_set_config(cfg, str(input_path), overrides)
        embeddings, labels, keys = embed_shards(model, cfg, str(input_path), batch_size)
    elif overrides:
        raise UserError(f"--set: {input_path} is not a shard set; data.* settings apply to shards only")
    else:
        embeddings, labels, keys = embed_input(model, spec, cfg, Path(input_path), side, batch_size)
    optional = {} if labels is None else {"labels": np.array(labels, dtype=np.int64)}
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.stem}.tmp.npz")
    np.savez(temporary, embeddings=embeddings.numpy(), keys=np.array(keys), **optional)  # type: ignore[arg-type]
    os.replace(temporary, out)
    return len(keys)


@torch.no_grad()
def embed_input(model: EmbeddingModel, spec: InputSpec, cfg: Config, input_path: Path, side: str,
                batch_size: int) -> Rows:
    """Embeddings, labels (or None) and keys of an image folder, a text file or shards."""
    if (input_path / INDEX_FILE).is_file():
        return embed_shards(model, cfg, input_path, batch_size)
    if input_path.is_dir():
        _expect(spec, "image", input_path)
        return _embed_images(model, spec, input_path, side, batch_size)
    if input_path.is_file():
        _expect(spec, "text", input_path)
        return _embed_lines(model, cfg, input_path, side, batch_size)
    raise DataError(f"{input_path}: no such file or directory")


def _expect(spec: InputSpec, modality: str, input_path: Path) -> None:
    if spec.modality != modality:
        raise DataError(f"{input_path}: this model's tower takes {spec.modality} inputs, not {modality}s")


def _embed_images(model: EmbeddingModel, spec: InputSpec, root: Path, side: str, batch_size: int) -> Rows:
    """An image folder through the side's exported image preprocessing (see `image_preprocessor`)."""
    source = read_image_folder(root)
    items = [record[0] for record in source.records]
    keys = image_keys(items, root)
    preprocessor = image_preprocessor(model, spec, side, source.spec.shape, root)
    embeddings = embed_images(model, preprocessor, items, keys, side, batch_size)
    return embeddings, [int(item.label) for item in items if item.label is not None], keys


def image_keys(items: Sequence[Item], root: Path) -> list[str]:
    """Keys of an image folder's items: their paths below `root`."""
    return [str(item.path.relative_to(root)) if item.path else f"{i:08d}" for i, item in enumerate(items)]


def image_preprocessor(model: EmbeddingModel, spec: InputSpec, side: str, shape: Sequence[int] | None,
                       where: Path) -> Preprocessor:
    """The side's exported image preprocessing (evaluation transforms: shorter-side resize and centre crop, so
    photos of any size embed as the model saw them); exports without one take images of the model's fixed size
    (`shape`: the images' [C, H, W], checked when known) as [0, 1] pixels."""
    exported = dict(getattr(model, "preprocessing", None) or {})
    preprocessor = exported.get(side) or exported.get("a")
    if preprocessor is not None and preprocessor.to_dict().get("name") == "image":
        return preprocessor
    if shape is not None and tuple(shape)[1:] != spec.shape[1:]:
        raise DataError(f"{where}: images are {tuple(shape)}, the model takes {spec.shape} (C,H,W)")
    return PixelPreprocessor((spec.shape[0], spec.shape[1], spec.shape[2]))


@torch.no_grad()
def embed_images(model: EmbeddingModel, preprocessor: Preprocessor, items: Sequence[Item], keys: Sequence[str],
                 side: str, batch_size: int) -> torch.Tensor:
    """Embeddings of image items through `preprocessor` and the tower of `side`, in batches."""
    parts = []
    for chunk, chunk_keys in zip(_chunks(list(items), batch_size), _chunks(list(keys), batch_size), strict=True):
        rows = [_prepare_image(preprocessor, item, key) for item, key in zip(chunk, chunk_keys, strict=True)]
        parts.append(model(preprocessor.collate(rows), side))
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def _prepare_image(preprocessor: Preprocessor, item: Item, key: str) -> Any:
    try:
        return preprocessor.prepare(item.read(), item.ext, SampleContext(key))
    except DataError:
        raise
    except Exception as error:  # any decoder failure: name the file
        raise DataError(f"{item.path or key}: cannot decode the image ({type(error).__name__}: {error})") from None


def _embed_lines(model: EmbeddingModel, cfg: Config, path: Path, side: str, batch_size: int) -> Rows:
    lines = read_lines(path)
    return embed_texts(model, cfg, lines, side, batch_size), None, [f"{i:08d}" for i in range(len(lines))]


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file (one item each)."""
    try:
        lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({error})") from None
    if not lines:
        raise DataError(f"{path}: no text lines to embed")
    return lines


def read_jsonl(path: Path) -> tuple[list[str], list[str], list[int] | None, list[str] | None]:
    """Texts, keys, labels and label names of a .jsonl file: one object per line with `text`, optional `key`
    (default: the item's position) and `label` (integers as given; other labels numbered in sorted order, their
    names returned)."""
    texts: list[str] = []
    keys: list[str] = []
    raw_labels: list[Any] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read it as UTF-8 JSON lines ({error})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{number}: expected an object with a \"text\" string")
        texts.append(row["text"])
        keys.append(str(row.get("key", f"{len(keys):08d}")))
        raw_labels.append(row.get("label"))
    if not texts:
        raise DataError(f"{path}: no JSON lines to embed")
    labels, names = _label_ids(raw_labels, path)
    return texts, keys, labels, names


def _label_ids(raw: list[Any], path: Path) -> tuple[list[int] | None, list[str] | None]:
    if all(label is None for label in raw):
        return None, None
    if any(label is None for label in raw):
        raise DataError(f"{path}: some lines have a \"label\" and some do not; give every line one or none")
    if all(isinstance(label, int) and not isinstance(label, bool) for label in raw):
        return [int(label) for label in raw], None
    names = sorted({str(label) for label in raw})
    position = {name: i for i, name in enumerate(names)}
    return [position[str(label)] for label in raw], names


@torch.no_grad()
def embed_texts(model: EmbeddingModel, cfg: Config, texts: Sequence[str], side: str, batch_size: int,
                first: int = 0) -> torch.Tensor:
    """Embeddings of texts through the side's training preprocessing (`side_preprocessors`) and tower; `first`:
    the position of texts[0] in its corpus (the sample key the preprocessing is seeded with)."""
    sides, exported = side_preprocessors(model, cfg), getattr(model, "preprocessing", None) or {}
    # A Siamese model trained on one side only exported that side's tokenizer: side b reads texts the same way.
    preprocessor = sides[side] if side in exported or "a" not in exported else sides["a"]
    parts = []
    for start, chunk in enumerate(_chunks(list(texts), batch_size)):
        offset = first + start * batch_size
        rows = [preprocessor.prepare(text.encode("utf-8"), "txt", SampleContext(f"{offset + i:08d}"))
                for i, text in enumerate(chunk)]
        parts.append(model(preprocessor.collate(rows), side))
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def side_preprocessors(model: EmbeddingModel, cfg: Config) -> dict[str, Preprocessor]:
    """Per side, the text preprocessing the model was trained with: the exported one (`load_exported` sets
    `model.preprocessing`), else, for exports that predate it, the run's hashed n-grams."""
    exported: dict[str, Preprocessor] = dict(getattr(model, "preprocessing", None) or {})
    hashed = HashedTextPreprocessor(cfg.data.text_buckets, (cfg.data.text_ngrams[0], cfg.data.text_ngrams[1]))
    return {side: exported.get(side, hashed) for side in ("a", "b")}


def shard_preprocessors(model: EmbeddingModel, cfg: Config, index: ShardIndex,
                        only_side: str | None = None) -> dict[str, Preprocessor]:
    """Per view of `index`: the exported preprocessing of the side that reads it (`only_side` when given) where the
    model recorded one (text views always: a tokenizer or the hashing of the run), else the toy default."""
    exported: dict[str, Preprocessor] = dict(getattr(model, "preprocessing", None) or {})
    sides = side_preprocessors(model, cfg)
    chosen = default_preprocessors(index, cfg.data)
    for view, spec in index.views.items():
        side = only_side or TOWER_SIDE[view]
        if spec.ext == "txt":
            chosen[view] = sides[side]
        elif side in exported and exported[side].to_dict().get("name") not in ("hashed_text", "tokenizer"):
            chosen[view] = exported[side]
    return chosen


@torch.no_grad()
def embed_shards(model: EmbeddingModel, cfg: Config, shard_dir: str | Path, batch_size: int,
                 part: int = 0, parts: int = 1, views: Sequence[str] | None = None,
                 side: str | None = None) -> Rows:
    """Every view of every sample, in index order; keys are `<sample key>/<view>`.

    `shard_dir`: any shard set `open_data` reads with `cfg.data` (see `shard_set_config`). `part` of `parts`: one
    contiguous run of the set's samples (`eval_batches`' shares: the parts in order are the whole set). `views`:
    only these views (default all); `side`: the tower every view goes through (default: each view's own)."""
    index = open_data(str(shard_dir), cfg.data)
    kind = index.kind
    chosen = [view for view in KIND_VIEWS[kind] if views is None or view in views]
    parts_out: list[torch.Tensor] = []
    labels: list[int] = []
    keys: list[str] = []
    preprocessors = shard_preprocessors(model, cfg, index, side)
    for batch in eval_batches(shard_dir, cfg.data, batch_size=batch_size, rank=part, world_size=parts,
                              preprocessors=preprocessors):
        for view in chosen:
            parts_out.append(model(batch["views"][view], side or TOWER_SIDE[view]))
            keys.extend(f"{key}/{view}" for key in batch["keys"])
            if view in batch["labels"]:
                labels.extend(int(v) for v in batch["labels"][view])
    embeddings = torch.cat(parts_out) if parts_out else torch.zeros(0, 0)
    return embeddings, labels if len(labels) == len(keys) else None, keys


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_exported(model_path: Path, shard_dir: str | Path | None,
                      overrides: Sequence[str] = ()) -> dict[str, float]:
    """Metrics of an exported model on a shard set (default: the run's held-out split); `overrides`: `data.*`
    settings of the set (see `shard_set_config`)."""
    model, _, cfg = load_model(model_path)
    if shard_dir is not None:
        cfg = shard_set_config(cfg, str(shard_dir), overrides)
    elif overrides:
        raise UserError("--set: give the shard set with --data SPEC")
    target = cfg.data.test
    if target is None:
        raise UserError(f"{model_path}: the run has no data.test; pass --data SHARDS")
    preprocessors = shard_preprocessors(model, cfg, open_data(target, cfg.data))
    return evaluate(model, cfg, torch.device("cpu"), target, preprocessors=preprocessors)
