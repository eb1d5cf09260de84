"""Opening a shard set: a Twinscale shard directory, or any WebDataset shard set with a field map.

`data.train` / `data.test` name one of:
- a Twinscale shard directory (local or a URL) holding `index.json`, written by `twinscale shards`;
- a WebDataset shard set written by any tool: a brace pattern (`/data/{00000..00999}.tar`,
  `s3://bucket/train/{000000..004095}.tar`), a glob (`/data/*.tar`), several of those joined by `::` (a YAML list
  is joined so), `pipe:CMD` URLs, or a directory of `*.tar` files. It needs `data.fields`, which says which
  members form which view and where labels come from, e.g. `{a: "jpg;png;webp", b: txt}` (pairs) or
  `{input: "jpg;png", label: json.label}` (labeled, class id from the key `label` of the `json` member).

Either way the rest of the pipeline gets the same `ShardIndex`: a foreign set becomes an index of its kind, its
views (a view may list several extensions; images have no fixed shape) and its shards' sample counts, read from
a counts index (`twinscale scan SPEC --out index.json`, found at `data.index` or as index.json next to the
shards). Without counts a training set can still be streamed in resampled mode (`data.epoch_samples`). In the
stream `FieldMap` renames a foreign sample's members into Twinscale's (`a.jpg`, `cls`, …) right after the tar
reader, which reads only the mapped members' bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import braceexpand

from trainer.data import remote
from trainer.data.formats import FORMAT_NAME, INDEX_FILE, KIND_VIEWS, ShardIndex, ShardInfo, ViewSpec, parse_index
from trainer.errors import DataError

COUNTS_FORMAT = "twinscale-shard-counts"
IMAGE_FIELD_EXTS = ("jpg", "jpeg", "png", "webp")
FIELD_EXTS = ("npy", "txt", *IMAGE_FIELD_EXTS)
LIST_SEPARATOR = "::"
"""Joins several patterns in one spec string, as WebDataset does."""


# --- The field map ---

@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """A parsed `data.fields`."""

    kind: str
    views: dict[str, tuple[str, ...]]
    """view → member extensions, the first present one is read."""
    label: str | None
    """Member holding an integer class id (`cls`), or `json.KEY[.KEY]` for a key of the json member."""
    similar: str | None
    """Pairs: member holding 1/0; None means every pair is similar (image–text pairs)."""


def parse_fields(fields: dict[str, str]) -> FieldSpec:
    """Validate a field map; ValueError names the offending key (config validation reports it as data.fields)."""
    views = [key for key in fields if key not in ("label", "similar")]
    kind = next((kind for kind, names in KIND_VIEWS.items() if set(names) == set(views)), None)
    if kind is None:
        shapes = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in KIND_VIEWS.items())
        raise ValueError(f"data.fields: views {', '.join(views) or '(none)'} form no shard kind ({shapes}; plus "
                         f"optional label and, for pairs, similar)")
    if "similar" in fields and kind != "pairs":
        raise ValueError("data.fields.similar: only pairs have a similar flag")
    parsed: dict[str, tuple[str, ...]] = {}
    for view in KIND_VIEWS[kind]:
        exts = tuple(ext.strip().lower().lstrip(".") for ext in str(fields[view]).split(";") if ext.strip())
        unknown = [ext for ext in exts if ext not in FIELD_EXTS]
        if not exts or unknown:
            raise ValueError(f"data.fields.{view}: {fields[view]!r}: extensions are ';'-separated, each one of "
                             f"{', '.join(FIELD_EXTS)}")
        if len(exts) > 1 and not all(ext in IMAGE_FIELD_EXTS for ext in exts):
            raise ValueError(f"data.fields.{view}: {fields[view]!r}: only image extensions can be alternatives")
        parsed[view] = exts
    for key in ("label", "similar"):
        if key in fields and not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", str(fields[key])):
            raise ValueError(f"data.fields.{key}: {fields[key]!r} is not a member name or json.KEY")
    return FieldSpec(kind, parsed, fields.get("label"), fields.get("similar"))


def raw_members(fields: dict[str, str]) -> set[str]:
    """Member suffixes a foreign sample's field map reads; every other member is skipped unread."""
    spec = parse_fields(fields)
    names = {ext for exts in spec.views.values() for ext in exts}
    for source in (spec.label, spec.similar):
        if source is not None:
            names.add("json" if source.startswith("json.") else source.lower())
    return names


class FieldMap:
    """Pipeline stage: a foreign sample's members renamed into a Twinscale sample of the field map's kind.

    `{jpg, txt, json}` with `{a: "jpg;png", b: txt, label: json.label}` → `{a.jpg, b.txt, a.cls, b.cls,
    similar}`. A member that is absent (or a label that is not there) is left out: the decoder then counts the
    sample as corrupt, as it does for a Twinscale sample with a missing member."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.spec = parse_fields(fields)

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            yield self.rename(sample)

    def rename(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One sample's members under Twinscale's names."""
        members = {key.lower(): value for key, value in sample.items() if not key.startswith("__")}
        out = {key: value for key, value in sample.items() if key.startswith("__")}
        for view, exts in self.spec.views.items():
            ext = next((ext for ext in exts if ext in members), None)
            if ext is not None:
                out[f"{view}.{ext}"] = members[ext]
        label = self._value(members, self.spec.label) if self.spec.label else None
        if label is not None:
            for view in self.spec.views:
                out["cls" if self.spec.kind == "labeled" else f"{view}.cls"] = label
        if self.spec.kind == "pairs":
            similar = self._value(members, self.spec.similar) if self.spec.similar else b"1"
            if similar is not None:
                out["similar"] = similar
        return out

    @staticmethod
    def _value(members: dict[str, bytes], source: str) -> bytes | None:
        if not source.startswith("json."):
            return members.get(source.lower())
        try:
            value: Any = json.loads(members["json"])  # JSON only: nothing from a shard is ever unpickled
            for key in source.split(".")[1:]:
                value = value[key]
        except (KeyError, TypeError, IndexError, ValueError):
            return None
        return str(value).encode() if isinstance(value, (int, str)) and not isinstance(value, bool) else None


# --- Specs: which tar files a spec names ---

def is_pattern(spec: str) -> bool:
    """Whether `spec` names tar files (a pattern, glob, list or pipe) rather than a Twinscale directory."""
    return (LIST_SEPARATOR in spec or "{" in spec or any(char in spec for char in "*?[")
            or spec.startswith("pipe:") or spec.rstrip("/").endswith((".tar", ".tar.gz", ".tgz")))


def expand(spec: str) -> list[str]:
    """The tar files (paths or URLs) a spec names, in order; DataError when a pattern matches nothing."""
    urls: list[str] = []
    for part in (piece.strip() for piece in spec.split(LIST_SEPARATOR)):
        if not part:
            continue
        if not is_pattern(part):  # a directory of tar files
            part = remote.join(part, "*.tar")
        for name in braceexpand.braceexpand(part):
            if any(char in name for char in "*?[") and not name.startswith("pipe:"):
                found = remote.list_files(name)
                if not found:
                    raise DataError(f"{spec}: {name} matches no file")
                urls.extend(found)
            else:
                urls.append(name)
    if not urls:
        raise DataError(f"{spec}: names no shard")
    _check_exist(spec, urls)
    return urls


def _check_exist(spec: str, urls: list[str]) -> None:
    # One listing per directory instead of one request per shard; pipes and plain HTTP cannot be listed.
    listable = [url for url in urls if not url.startswith(("pipe:", "http://", "https://"))]
    directories = sorted({remote.parent(url) for url in listable})
    present: set[str] = set()
    for directory in directories:
        present.update(remote.list_files(remote.join(directory, "*")))
    missing = [url for url in listable if url not in present]
    if missing:
        raise DataError(f"{spec}: {len(missing)} of {len(urls)} shard(s) do not exist, e.g. {missing[0]}")


# --- Opening a shard set ---

def open_shard_set(spec: str, fields: dict[str, str] | None = None, index: str | None = None,
                   epoch_samples: int | None = None, weights: tuple[float, ...] | None = None) -> ShardIndex:
    """The index of the shard set `spec` names (see the module docstring); DataError names what is wrong.

    `index`: where the counts index is (default: index.json next to the shards); `epoch_samples`: set for a
    resampled training set, which may then have no counts (its shards count 0 samples)."""
    if fields is None and weights is not None:
        return _mixed_twinscale(spec, weights)
    if fields is None:
        if is_pattern(spec):
            raise DataError(f"{spec}: a WebDataset shard set needs data.fields, e.g. {{input: jpg;png, label: cls}}")
        return _twinscale_index(spec)
    try:
        field_spec = parse_fields(fields)
    except ValueError as error:
        raise DataError(str(error)) from None
    parts = [expand(part) for part in spec.split(LIST_SEPARATOR) if part.strip()] if weights else [expand(spec)]
    urls = [url for part in parts for url in part]
    # Mixing: a source's weight is shared by its shards, so each source is drawn with its weight whatever its size.
    shard_weights = [w / len(part) for w, part in zip(weights or (1.0,), parts, strict=True) for _ in part]
    location = _common_parent(urls)
    counts = _counts(spec, urls, index or (remote.join(location, INDEX_FILE) if location else None),
                     required=epoch_samples is None)
    shards = tuple(ShardInfo(_relative(url, location), counts.get(url, 0), weight)
                   for url, weight in zip(urls, shard_weights, strict=True))
    views = {view: ViewSpec(exts[0], None, exts[1:]) for view, exts in field_spec.views.items()}
    return ShardIndex(kind=field_spec.kind, views=views, labels=field_spec.label is not None, num_classes=None,
                      shards=shards, source=spec, location=location, fields=dict(fields))


def open_data(spec: str, cfg: Any, *, train: bool = False) -> ShardIndex:
    """`open_shard_set` with a DataConfig's settings: its counts index for `data.train`/`data.test`, and resampled
    mode (`data.epoch_samples`) when streaming the training set for training (`train`)."""
    index = cfg.index if spec == cfg.train else cfg.test_index if spec == cfg.test else None
    weights = cfg.train_weights if spec == cfg.train else None
    return open_shard_set(spec, cfg.fields, index, cfg.epoch_samples if train else None, weights)


def _mixed_twinscale(spec: str, weights: tuple[float, ...]) -> ShardIndex:
    """Several Twinscale shard directories mixed by weight: one index of all their shards (as full paths/URLs)."""
    indexes = [_twinscale_index(part.strip()) for part in spec.split(LIST_SEPARATOR) if part.strip()]
    first = indexes[0]
    for part, index in zip(spec.split(LIST_SEPARATOR), indexes, strict=True):
        if (index.kind, index.views, index.labels, index.pack) != (first.kind, first.views, first.labels, first.pack):
            raise DataError(f"data.train: source {part.strip()} holds {index.kind} shards of other views, labels or "
                            f"packing (--pack) than the first source; mixed sources must match")
    shards = tuple(ShardInfo(index.url(shard.file), shard.samples, weight / len(index.shards))
                   for weight, index in zip(weights, indexes, strict=True) for shard in index.shards)
    classes = [index.num_classes for index in indexes if index.num_classes is not None]
    return dataclasses.replace(first, shards=shards, location="", source=spec,
                               num_classes=max(classes) if classes else None)


def _twinscale_index(location: str) -> ShardIndex:
    if not remote.is_url(location):
        from trainer.data.formats import read_index

        return read_index(location)
    where = remote.join(location, INDEX_FILE)
    if not remote.exists(where):
        raise DataError(f"{where}: shard index not found; a WebDataset set needs data.fields, a Twinscale set "
                        f"its index.json")
    try:
        raw = json.loads(remote.read_bytes(where))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{where}: not a readable JSON shard index ({error})") from None
    return parse_index(raw, where, location)


def _counts(spec: str, urls: list[str], where: str | None, *, required: bool) -> dict[str, int]:
    if where is None or not remote.exists(where):
        if required:
            raise DataError(f"{spec}: no sample counts ({where or 'no index.json next to the shards'} not found); "
                            f"run `twinscale scan '{spec}' --out index.json` and set data.index, or stream it "
                            f"resampled with data.epoch_samples")
        return {}
    try:
        raw = json.loads(remote.read_bytes(where))
        if not isinstance(raw, dict) or raw.get("format") not in (COUNTS_FORMAT, FORMAT_NAME):
            raise ValueError(f'"format" must be "{COUNTS_FORMAT}" (written by twinscale scan)')
        base = remote.parent(where)
        counts = {remote.join(base, str(entry["file"])): int(entry["samples"]) for entry in raw["shards"]}
    except (DataError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{where}: not a shard counts index ({error})") from None
    missing = [url for url in urls if url not in counts]
    if missing:
        raise DataError(f"{where}: has no count for {len(missing)} shard(s) of {spec}, e.g. {missing[0]}; scan "
                        f"them again with `twinscale scan`")
    return counts


def _common_parent(urls: list[str]) -> str:
    parents = {remote.parent(url) for url in urls if not url.startswith("pipe:")}
    return parents.pop() if len(parents) == 1 else ""


def _relative(url: str, location: str) -> str:
    prefix = location.rstrip("/") + "/"
    return url[len(prefix):] if location and url.startswith(prefix) else url


def counts_index(spec: str, urls: list[str], counts: list[int], where: str) -> dict[str, object]:
    """The JSON of a counts index at `where`: shard names relative to its directory when inside it."""
    base = remote.parent(where)
    return {"format": COUNTS_FORMAT, "version": 1, "source": spec, "num_samples": sum(counts),
            "shards": [{"file": _relative(url, base), "samples": count}
                       for url, count in zip(urls, counts, strict=True)]}


# --- Reading shards: a tar stage with remote opening and retries ---

def shard_samples(handler: Callable[[Exception], bool], select_files: Callable[[str], bool],
                  fields: dict[str, str] | None = None) -> ShardSamples:
    """Pipeline stage replacing `wds.tarfile_to_samples` (see `ShardSamples`)."""
    return ShardSamples(handler, select_files, fields)


class ShardSamples:
    """Pipeline stage: opens each `{"url"}` locally or remotely (with retries, `remote.open_shard`), expands its
    tar members (only those `select_files` accepts are read), groups them into samples and, for a foreign set,
    renames them (`FieldMap`). A shard that cannot be opened or read goes to `handler`, like a corrupt one.
    A class, not a closure: DataLoader workers started by spawn receive the pipeline pickled."""

    def __init__(self, handler: Callable[[Exception], bool], select_files: Callable[[str], bool],
                 fields: dict[str, str] | None = None) -> None:
        self.handler, self.select_files, self.fields = handler, select_files, fields

    def __call__(self, sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys

        samples = group_by_keys(self._members(sources), handler=self.handler)
        return FieldMap(self.fields)(samples) if self.fields is not None else samples

    def _members(self, sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tar_file_expander

        for source in sources:
            url = source["url"]
            try:
                stream = remote.open_shard(url)
            except Exception as error:  # a missing object, refused credentials, an unreachable server
                error.args = (*error.args, url)
                if self.handler(error):
                    continue
                return
            with contextlib.closing(stream):
                yield from tar_file_expander([{**source, "stream": stream}], handler=self.handler,
                                             select_files=self.select_files)
