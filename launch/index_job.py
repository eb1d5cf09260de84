"""`twinscale index MODEL DATA --out DIR`: embed a corpus part by part (here or in Ray tasks), then index it.

    twinscale index runs/digits data/digits/test --out indexes/digits                  # one process, exact index
    twinscale index runs/glyphs glyph_images/ --out idx --index hnsw --workers 4       # 4 Ray tasks at a time
    twinscale index s3://bucket/runs/x s3://bucket/shards/train --out idx --address ray://head:10001 --index ivf

Parts are written to DIR/parts/ as they finish, so an interrupted run resumes where it stopped, and a rerun with
another --index reuses them (trainer/index.py). With `--workers 1` and no `--address` the parts are embedded in
this process without Ray; otherwise each part is one Ray task (one CPU, torch on one thread), credentials passed
through the environment as launch/scan.py passes them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from launch.scan import CREDENTIAL_ENV
from trainer.errors import DataError, UserError
from trainer.index import Corpus, IndexSettings, PartJob


def cmd_index(args: argparse.Namespace) -> int:
    """Embed DATA with MODEL into `args.out` and build the index; prints a summary."""
    from trainer import index as idx

    started = time.perf_counter()
    _check_flags(args)
    idx.check_out_dir(args.out)
    model_ref, model_path = _model_reference(args.model)
    corpus, items = open_corpus(model_path, args.data, args.side, args.part_size, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    done = idx.finished_parts(args.out, corpus)
    todo = [part for part in range(corpus.parts) if part not in done]
    jobs = idx.part_jobs(str(model_path), corpus, items, args.part_size, args.batch_size, todo)
    embedded = time.perf_counter()
    embed_parts(jobs, args.out, corpus, args.workers, args.address)
    embedded = time.perf_counter() - embedded
    settings = IndexSettings(args.index_type, args.nlist, args.nprobe, args.hnsw_m, args.ef_search)
    built = time.perf_counter()
    document = idx.write_index(args.out, corpus, settings, model_ref, items.label_names if items else None)
    built = time.perf_counter() - built
    new_items = sum(len(job.keys) for job in jobs) if items else document["count"] * len(todo) // corpus.parts
    rate = f", {new_items / embedded:.0f} items/s embedding" if todo and embedded > 0 else ""
    print(f"indexed {document['count']} items (dim {document['dim']}, {args.index_type}) from {len(todo)} new and "
          f"{len(done)} finished parts in {time.perf_counter() - started:.1f} s{rate}, build {built:.1f} s "
          f"→ {args.out}")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--workers", args.workers), ("--batch-size", args.batch_size), ("--nprobe", args.nprobe),
                        ("--hnsw-m", args.hnsw_m), ("--ef-search", args.ef_search), ("--part-size", args.part_size)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be ≥ 1")
    if args.nlist is not None and args.nlist < 1:
        raise UserError(f"--nlist {args.nlist}: must be ≥ 1")


def _model_reference(model: str) -> tuple[str, Path]:
    """What index.json records (a URL as given, else the model directory's absolute path) and the local model."""
    from launch.cli import local_model
    from trainer.data.remote import is_url
    from trainer.embed import model_dir

    path = local_model(model)
    directory = model_dir(path)
    if not (directory / "config.json").is_file():
        raise UserError(f"{model}: no exported model (expected a run directory with model/config.json)")
    return (model.rstrip("/") if is_url(model) else str(directory.resolve())), path


def open_corpus(model_path: Path, data: str, side: str | None, part_size: int,
                overrides: Sequence[str]) -> tuple[Corpus, Any]:
    """The corpus to index and, for a file or folder, its items (None for a shard set)."""
    from trainer import index as idx
    from trainer.data.remote import is_url
    from trainer.embed import run_config, shard_set_config
    from trainer.models.export import CONFIG_FILE

    document = _read_model_config(model_path, CONFIG_FILE)
    kind = idx.corpus_kind(data)
    spec = str(Path(data).resolve()) if not is_url(data) and Path(data).exists() else data
    if kind != "shards":
        if overrides:
            raise UserError(f"--set: {data} is not a shard set; data.* settings apply to shards only")
        modality = "image" if kind == "images" else "text"
        corpus_side = idx.choose_side(document, modality, side, data)
        probe = Corpus(spec, kind, modality, corpus_side, document["weights_sha256"], 0, 1)
        items = idx.read_items(probe)
        count = len(items.keys)
        return Corpus(spec, kind, modality, corpus_side, document["weights_sha256"], count,
                      idx.file_parts(count, part_size)), items
    from trainer.data.shardsets import open_data

    cfg = run_config(model_path, document)
    shard_index = open_data(spec, shard_set_config(cfg, spec, overrides).data)
    views, modality, corpus_side = _shard_views(shard_index, document, side, data)
    return Corpus(spec, kind, modality, corpus_side, document["weights_sha256"], shard_index.num_samples,
                  idx.shard_parts(len(shard_index.shards)), views, tuple(overrides)), None


def _read_model_config(model_path: Path, name: str) -> dict[str, Any]:
    import json

    from trainer.embed import model_dir

    try:
        document: dict[str, Any] = json.loads((model_dir(model_path) / name).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{model_dir(model_path) / name}: cannot read the exported model's config ({error})") from None
    return document


def _shard_views(shard_index: Any, document: dict[str, Any], side: str | None,
                 data: str) -> tuple[tuple[str, ...], str, str]:
    """The views of a shard set to index (those of one modality), that modality and the tower reading them."""
    from trainer.index import EXT_MODALITY, choose_side

    inputs = document["inputs"]
    modalities = {view: EXT_MODALITY.get(spec.ext, "vector") for view, spec in shard_index.views.items()}
    kinds = sorted(set(modalities.values()))
    if len(kinds) == 1:
        modality = kinds[0]
    elif side is not None:
        modality = str((inputs.get(side) or inputs["a"])["modality"])
    else:
        raise UserError(f"{data}: its views hold {' and '.join(kinds)} items; choose the tower with --side a|b")
    chosen = choose_side(document, modality, side, data)
    views = tuple(view for view, kind in modalities.items() if kind == modality)
    if not views:
        raise DataError(f"{data}: no {modality} views to index with --side {chosen}")
    return views, modality, chosen


def embed_parts(jobs: list[PartJob], out: Path, corpus: Corpus, workers: int, address: str | None) -> None:
    """Embed and write every job's part: in this process with one worker and no cluster, else as Ray tasks."""
    if not jobs:
        return
    from trainer.index import write_part

    bar = _progress(sum(len(job.keys) for job in jobs) or None, "items" if jobs[0].keys else "parts")
    runner = _local_parts if workers == 1 and address is None else _ray_parts(workers, address)
    try:
        for job, arrays in runner(jobs):
            write_part(out, job.part, arrays, corpus)
            bar.update(len(job.keys) or 1)
    finally:
        bar.close()


def _progress(total: int | None, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=None)


def _local_parts(jobs: list[PartJob]) -> Iterator[tuple[PartJob, dict[str, Any]]]:
    from trainer.index import embed_part

    for job in jobs:
        yield job, embed_part(job)


def _ray_parts(workers: int, address: str | None) -> Callable[[list[PartJob]], Iterator[tuple[PartJob, Any]]]:
    """A runner that embeds parts in Ray tasks, at most `workers` at a time, yielding each as it finishes."""

    def run(jobs: list[PartJob]) -> Iterator[tuple[PartJob, Any]]:
        import ray

        from launch.ray_launch import start_ray

        start_ray(address, False)
        env = {name: os.environ[name] for name in CREDENTIAL_ENV if name in os.environ}
        task: Any = ray.remote(num_cpus=1)(_embed_part_task).options(runtime_env={"env_vars": env})
        waiting, running = list(jobs), dict[Any, PartJob]()
        try:
            while waiting or running:
                while waiting and len(running) < workers:
                    job = waiting.pop(0)
                    running[task.remote(job)] = job
                ready, _ = ray.wait(list(running), num_returns=1)
                yield running.pop(ready[0]), _task_result(ray, ready[0])
        finally:
            ray.shutdown()

    return run


def _task_result(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:  # a DataError inside a task: its one line, exit code 2
        cause = error.cause if isinstance(error.cause, UserError) else None
        raise cause or DataError(f"index: an embedding task failed ({error})") from None


def _embed_part_task(job: PartJob) -> dict[str, Any]:
    import torch

    from trainer.index import embed_part

    torch.set_num_threads(1)  # one CPU per task: more threads only contend with the other tasks
    return embed_part(job)
