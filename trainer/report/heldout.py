"""What the report shows of the held-out split: verification pairs (histograms, ROC), a 2-D PCA map of a seeded
sample of embeddings, nearest-neighbour galleries (a seeded choice of queries and the worst ones) and precision@1
per class.

Queries and documents by split kind: labeled — every item queries the others (right: same label); pairs — side-a
items query side-b items (right: the pair's own document, or one with equal content, for a similar pair);
triplets — anchors query positives (right: one of the anchor's class when the split has class ids, else the
triplet's own positive). One faiss search of k neighbours per query (trainer/report/neighbours.py); memory
O(N·D + N·k), never N×N.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.config import Config, ReportConfig
from trainer.data.formats import ShardIndex
from trainer.engine.evaluate import EmbeddedShare
from trainer.report.items import Preview, preview, raw_samples
from trainer.report.neighbours import (
    ClassPrecision,
    Neighbours,
    has_partner,
    nearest,
    per_class_precision,
    worst_queries,
)
from trainer.verification import VerificationPairs, heldout_pairs

SIDES = {"labeled": ("input", "input"), "pairs": ("a", "b"), "triplets": ("anchor", "positive")}
"""Query view and document view of each split kind."""


@dataclass(frozen=True)
class GalleryRow:
    """One query and its nearest documents: (preview, cosine similarity, right or None when unknown)."""

    query: Preview
    neighbours: list[tuple[Preview, float, bool | None]]


@dataclass(frozen=True)
class Gallery:
    title: str
    rows: list[GalleryRow]


@dataclass(frozen=True)
class MapPoints:
    """A 2-D PCA projection of sampled embeddings and the group (class or view) of each point."""

    coords: np.ndarray
    groups: np.ndarray
    names: list[str]
    coloured_by: str


@dataclass
class HeldOutFigures:
    """Everything the report draws from the held-out split; `missing` says why a part could not be drawn."""

    items: int = 0
    pairs: VerificationPairs | None = None
    points: MapPoints | None = None
    galleries: list[Gallery] = field(default_factory=list)
    per_class: list[ClassPrecision] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Search:
    """The split's queries against its documents: neighbours, whether each is right, which queries count."""

    neighbours: Neighbours
    right: np.ndarray | None
    eligible: np.ndarray


def analyse(share: EmbeddedShare, index: ShardIndex, settings: ReportConfig, seed: int = 0) -> HeldOutFigures:
    """The held-out figures of an embedded split (one process's whole split, in index order)."""
    result = HeldOutFigures(items=len(next(iter(share.embeddings.values()))))
    result.pairs = heldout_pairs(share, seed=seed)
    if result.pairs is None:
        result.missing["distances"] = "no verification pairs: the split has no labels, or fewer than two classes"
    result.points = sample_map(share, settings.max_map_points, seed)
    if result.items < 2:
        result.missing["galleries"] = "fewer than two held-out items"
        return result
    search = search_split(share, settings.neighbours)
    result.galleries = galleries(share, index, search, settings, seed)
    query_view = SIDES[share.kind][0]
    if share.kind != "pairs" and query_view in share.labels and search.right is not None:
        labels = share.labels[query_view].numpy()
        result.per_class = per_class_precision(labels, search.right[:, 0], search.eligible)
    else:
        result.missing["per_class"] = "precision@1 per class needs class ids (a labeled or triplet split with them)"
    return result


def search_split(share: EmbeddedShare, k: int) -> Search:
    """Each query's k nearest documents, and which of them are right."""
    query_view, doc_view = SIDES[share.kind]
    queries, documents = share.embeddings[query_view].numpy(), share.embeddings[doc_view].numpy()
    found = nearest(documents, queries, k, same_items=share.kind == "labeled")
    own = np.arange(len(queries))[:, None]
    if share.kind == "labeled":
        if query_view not in share.labels:
            return Search(found, None, np.ones(len(queries), bool))
        labels = share.labels[query_view].numpy()
        return Search(found, labels[found.ids] == labels[:, None], has_partner(labels))
    if share.kind == "pairs":
        assert share.similar is not None
        similar = share.similar.numpy() > 0.5
        content = share.content.get(doc_view)
        same = found.ids == own if content is None else content.numpy()[found.ids] == content.numpy()[:, None]
        return Search(found, same & similar[:, None], similar)
    if query_view in share.labels and doc_view in share.labels:  # triplets with class ids: any positive of its class
        labels = share.labels[query_view].numpy()
        return Search(found, share.labels[doc_view].numpy()[found.ids] == labels[:, None], np.ones(len(queries), bool))
    return Search(found, found.ids == own, np.ones(len(queries), bool))


def galleries(share: EmbeddedShare, index: ShardIndex, search: Search, settings: ReportConfig,
              seed: int) -> list[Gallery]:
    """A seeded choice of queries, and the worst queries when rightness is known, with their neighbours."""
    count = settings.gallery_queries
    candidates = np.flatnonzero(search.eligible)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False))
    groups = [("Nearest neighbours of a few held-out queries (seeded choice)", chosen)]
    if search.right is not None:
        worst = worst_queries(search.neighbours.scores[:, 0], search.right[:, 0], search.eligible, count)
        groups.append(("Worst queries: a wrong nearest neighbour, most similar first", worst))
    wanted = {int(q) for _, rows in groups for q in rows}
    wanted |= {int(d) for _, rows in groups for q in rows for d in search.neighbours.ids[q]}
    raw = raw_samples(index, wanted)
    return [Gallery(title, [_row(share, index, search, raw, int(q)) for q in rows]) for title, rows in groups]


def _row(share: EmbeddedShare, index: ShardIndex, search: Search, raw: dict, query: int) -> GalleryRow:
    query_view, doc_view = SIDES[share.kind]
    shown = [preview(raw.get(int(doc)), index, doc_view, _label(share, doc_view, int(doc)))
             for doc in search.neighbours.ids[query]]
    right = [None] * len(shown) if search.right is None else [bool(r) for r in search.right[query]]
    scores = [float(s) for s in search.neighbours.scores[query]]
    return GalleryRow(preview(raw.get(query), index, query_view, _label(share, query_view, query)),
                      list(zip(shown, scores, right, strict=True)))


def _label(share: EmbeddedShare, view: str, position: int) -> int | None:
    labels = share.labels.get(view)
    return None if labels is None or position >= len(labels) else int(labels[position])


def sample_map(share: EmbeddedShare, max_points: int, seed: int) -> MapPoints | None:
    """PCA to 2-D of a seeded sample of at most `max_points` embeddings of every view of the split."""
    from sklearn.decomposition import PCA

    views = list(share.embeddings)
    sizes = [len(share.embeddings[view]) for view in views]
    total = sum(sizes)
    if total < 3:
        return None
    picked = np.sort(np.random.default_rng(seed).choice(total, size=min(max_points, total), replace=False))
    view_of = np.searchsorted(np.cumsum(sizes), picked, side="right")
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rows = torch.stack([share.embeddings[views[v]][p - offsets[v]] for v, p in zip(view_of, picked, strict=True)])
    coords = PCA(n_components=2, random_state=seed).fit_transform(rows.numpy().astype(np.float64))
    if all(view in share.labels for view in views):
        labels = np.array([int(share.labels[views[v]][p - offsets[v]]) for v, p in zip(view_of, picked, strict=True)])
        classes, groups = np.unique(labels, return_inverse=True)
        return MapPoints(coords, groups, [f"class {c}" for c in classes], "class")
    return MapPoints(coords, view_of, [f"view {view}" for view in views], "view")


def embed_heldout(model: torch.nn.Module, cfg: Config, target: str) -> tuple[EmbeddedShare, ShardIndex]:
    """The whole held-out split embedded on the CPU with the exported preprocessing, and its shard index."""
    from trainer.data.shardsets import open_data
    from trainer.embed import shard_preprocessors
    from trainer.engine.evaluate import embed_split

    index = open_data(target, cfg.data)
    preprocessors = shard_preprocessors(model, cfg, index)  # type: ignore[arg-type]
    return embed_split(model, target, cfg, torch.device("cpu"), preprocessors=preprocessors), index
