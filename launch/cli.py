"""The `twinscale` command line: train, resume, shards, scan, embed, mine, eval, index, search, verify, export,
report, sweep, submit, jobs.

Heavy libraries (torch, Ray, DeepSpeed) are imported inside the commands, so `twinscale --help` is instant.
Bad input of any kind exits with code 2 and one message naming what is wrong, before anything is started.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from trainer.errors import CheckpointError, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinscale", description="Distributed metric-learning trainer.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model (default: the digits demo on 2 local workers)")
    train.add_argument("config", nargs="?", type=Path, help="YAML recipe (default: configs/default.yaml)")
    _add_run_options(train)
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set loss.margin=0.3 (repeatable)")
    train.add_argument("--workers", type=int, help="number of training workers (dist.workers)")
    train.add_argument("--resume", action="store_true", help="continue the named run from its newest checkpoint")

    resume = commands.add_parser("resume", help="continue a run from its newest complete checkpoint")
    resume.add_argument("run_dir", help="run directory, or its URL (s3://bucket/runs/NAME)")
    _add_run_options(resume)

    shards = commands.add_parser("shards", help="write WebDataset shards from a source")
    shards.add_argument("source", help="digits | an image folder root/<class>/*.png|jpg | a .csv/.jsonl/.parquet table")
    shards.add_argument("--kind", required=True, choices=("labeled", "pairs", "triplets"))
    shards.add_argument("--out", required=True, help="output directory or object-storage URL (s3://bucket/prefix)")
    shards.add_argument("--test-fraction", type=float, help="held-out fraction → OUT/train, OUT/test (stratified for "
                        "labeled sources, a seeded hash of each row for pairs/triplets tables)")
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--samples-per-shard", type=int, default=128)
    shards.add_argument("--pairs-per-item", type=int, default=1, help="pairs/triplets sampled per labeled item")
    shards.add_argument("--as-images", action="store_true", help="digits: write 8x8 PNG images, not vectors")
    shards.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    shards.add_argument("--workers", type=int, default=1, help="processes writing shards (same output as one)")
    shards.add_argument("--pack", type=int, default=1, help="samples per tar sample, for small npy/txt samples (a "
                        "block of N: fast to stream, same batches); 1 = one sample per tar sample")

    scan = commands.add_parser("scan", help="count the samples of a WebDataset shard set once (its index)")
    scan.add_argument("spec", help="tar files: a brace pattern, glob or :: list of paths/URLs, or a directory")
    scan.add_argument("--out", required=True, help="index to write (path or URL), e.g. next to the shards")
    scan.add_argument("--processes", type=int, help="counting processes (default: one per core)")
    scan.add_argument("--address", help="count with Ray tasks on this cluster (ray://HEAD:10001 or auto; "
                      "'local' starts Ray here), for thousands of shards")

    embed = commands.add_parser("embed", help="embed an image folder, a text file or shards with a trained model")
    embed.add_argument("model", help="a run directory or its model/ directory, or a run's URL (s3://…/runs/NAME)")
    embed.add_argument("input", help="image folder root/<class>/*, text file (one item per line), or a shard set "
                       "as data.train takes it (directory or URL, or tar files: a brace pattern, glob or :: list)")
    embed.add_argument("--out", required=True, type=Path, help="output .npz (embeddings, labels, keys)")
    embed.add_argument("--side", choices=("a", "b"), default="a", help="tower of a pseudo-Siamese model")
    embed.add_argument("--batch-size", type=int, default=512)
    _add_data_options(embed)

    mine = commands.add_parser("mine", help="write triplet shards of hard negatives mined with a trained model")
    mine.add_argument("model", help="a run directory or its model/ directory, or a run's URL (s3://…/runs/NAME)")
    mine.add_argument("shards", help="labeled shard set to mine (anchors and candidates), as data.train takes it")
    mine.add_argument("--out", required=True, type=Path, help="output directory of triplet shards")
    mine.add_argument("--skip-top", type=int, default=10,
                      help="nearest ranks skipped (likely near-duplicates or unlabeled positives)")
    mine.add_argument("--window", type=int, default=50, help="ranks after those searched for other-class negatives")
    mine.add_argument("--per-anchor", type=int, default=1, help="negatives (triplets) per anchor")
    mine.add_argument("--seed", type=int, default=0)
    mine.add_argument("--samples-per-shard", type=int, default=128)
    mine.add_argument("--batch-size", type=int, default=512, help="embedding batch size")
    mine.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_data_options(mine)

    sweep = commands.add_parser("sweep", help="hyperparameter sweep on Ray Tune: each trial a distributed run")
    sweep.add_argument("sweep_file", nargs="?", type=Path, help="sweep YAML (see configs/sweeps/)")
    sweep.add_argument("--resume", type=Path, metavar="SWEEP_DIR", help="continue an interrupted sweep")
    _add_run_options(sweep)

    submit = commands.add_parser("submit", help="submit a training run to a Ray cluster as a job")
    submit.add_argument("config", nargs="?", type=Path, help="YAML recipe inside the working directory")
    submit.add_argument("--address", required=True, help="the cluster's dashboard, http://HEAD:8265")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument("--working-dir", type=Path, default=Path("."),
                        help="directory uploaded as the job's working directory (default: .)")
    submit.add_argument("--pip", type=Path, metavar="REQUIREMENTS",
                        help="install these pinned packages for the job (e.g. constraints.txt)")
    submit.add_argument("--image", help="run the job in this container image (runtime_env image_uri)")
    submit.add_argument("--env", dest="env_names", action="append", default=[], metavar="NAME",
                        help="also pass this variable from your environment (W&B's are passed when set)")

    jobs = commands.add_parser("jobs", help="list submitted jobs, show or follow their logs, stop one")
    jobs.add_argument("action", choices=("list", "logs", "stop"))
    jobs.add_argument("job_id", nargs="?", help="job id (printed by submit)")
    jobs.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")

    evaluate = commands.add_parser("eval", help="evaluate a trained model on held-out shards")
    evaluate.add_argument("model", help="a run directory or its model/ directory, or a run's URL (s3://…/runs/NAME)")
    evaluate.add_argument("--data", help="shard set as data.test takes it: a directory or URL, or tar files (brace "
                          "pattern, glob or :: list) with a field map (default: the run's data.test)")
    _add_data_options(evaluate)
    index = commands.add_parser("index", help="embed a corpus with a trained model and build a faiss index of it")
    index.add_argument("model", help="a run directory or its model/ directory, or a run's URL (s3://…/runs/NAME)")
    index.add_argument("data", help="corpus: a shard set (directory, URL, brace pattern, glob or :: list), an image "
                       "folder root/<class>/*, a text file (one item per line) or a .jsonl file (text, key, label)")
    index.add_argument("--out", required=True, type=Path, help="index directory to write (resumable)")
    index.add_argument("--index", dest="index_type", choices=("flat", "ivf", "hnsw"), default="flat",
                       help="flat: exact inner product (default); ivf or hnsw: approximate, for millions of items")
    index.add_argument("--nlist", type=int, help="ivf: number of clusters (default: about 4·√N)")
    index.add_argument("--nprobe", type=int, default=16, help="ivf: clusters searched per query")
    index.add_argument("--hnsw-m", type=int, default=32, help="hnsw: neighbours per node")
    index.add_argument("--ef-search", type=int, default=128, help="hnsw: search depth per query")
    index.add_argument("--side", choices=("a", "b"), help="tower that embeds the corpus (default: the one whose "
                       "modality the corpus has; b for a two-tower model whose towers read the same modality)")
    index.add_argument("--batch-size", type=int, default=256)
    index.add_argument("--workers", type=int, default=1, help="Ray workers embedding parts of the corpus in parallel")
    index.add_argument("--address", help="Ray cluster for the workers (ray://HEAD:10001 or auto); default: local")
    index.add_argument("--part-size", type=int, default=4096, help="items per part of a file or folder corpus "
                       "(a shard set's parts are its shards); finished parts are kept, so a rerun resumes")
    _add_data_options(index)

    search = commands.add_parser("search", help="search an index with texts, image paths or a file of them")
    search.add_argument("index_dir", type=Path, help="directory written by `twinscale index`")
    search.add_argument("queries", nargs="*", help="texts or image paths")
    search.add_argument("--file", type=Path, help="a file of queries, one text or image path per line")
    search.add_argument("--k", type=int, default=10, help="results per query")
    search.add_argument("--json", action="store_true", help="print JSON lines instead of a table")

    verify = commands.add_parser("verify", help="same or different: a pair of texts or images, decided with the "
                                 "threshold chosen on the run's held-out split")
    verify.add_argument("model", help="a run directory (or its URL)")
    verify.add_argument("a", help="first item: a text or an image path")
    verify.add_argument("b", help="second item: a text or an image path")
    verify.add_argument("--threshold", type=float, help="decide with this cosine similarity instead")
    verify.add_argument("--json", action="store_true", help="print one JSON object")

    export = commands.add_parser("export", help="export a trained model for serving (ONNX, optionally int8)")
    export.add_argument("model", help="a run directory or its model/ directory, or a run's URL")
    export.add_argument("--format", dest="export_format", choices=("onnx",), default="onnx")
    export.add_argument("--quantize", choices=("int8",), help="also write a dynamically quantized int8 model")
    export.add_argument("--out", type=Path, help="output directory (default: RUN/onnx)")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset, 17–23 (default 18)")

    report = commands.add_parser("report", help="write runs/<name>/report.html: curves, distances, ROC, map, "
                                 "nearest-neighbour galleries and worst queries (written at the end of every run)")
    report.add_argument("run_dir", help="a run directory (or its URL)")
    report.add_argument("--out", type=Path, help="report file (default: RUN/report.html)")
    report.add_argument("--data", help="held-out shard set (default: the run's data.test)")
    return parser


def _add_data_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                         help="read the shard set with these data settings instead of the run's, e.g. --set "
                         "'data.fields={input: jpg;png, label: cls}' or --set data.test_index=s3://…/index.json")


def local_model(model: str) -> Path:
    """A model argument as a local path: a run on object storage is fetched (its outputs, not its checkpoints)."""
    from trainer.data.remote import is_url

    if not is_url(model):
        return Path(model)
    from trainer.remote_runs import fetch_outputs

    url = model.rstrip("/")
    if url.endswith("/model"):
        return fetch_outputs(url.rsplit("/", 1)[0]) / "model"
    return fetch_outputs(url)


def _add_run_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--address", help="Ray cluster address (ray://HOST:10001 or auto; for resume also "
                         "http://HEAD:8265: resume as a job on the cluster); default: local Ray")
    command.add_argument("--verbose", action="store_true", help="show Ray's and the workers' own logs")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_train(args: argparse.Namespace) -> int:
    from trainer import config

    overrides = list(args.overrides) + ([f"dist.workers={args.workers}"] if args.workers is not None else [])
    cfg = config.load(args.config, overrides)
    if cfg.name is None:
        stem = args.config.stem if args.config else "digits"
        cfg = cfg.model_copy(update={"name": f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"})
    return _train(cfg, resume=args.resume, address=args.address, verbose=args.verbose)


def cmd_resume(args: argparse.Namespace) -> int:
    from trainer import config
    from trainer.data.remote import is_url

    on_cluster = args.address is not None and args.address.startswith(("http://", "https://"))
    if is_url(args.run_dir) and on_cluster:  # a run on object storage: resumed by a job, its nodes fetch it
        from launch.jobs import submit_command

        return submit_command(["resume", args.run_dir.rstrip("/")], args.address, working_dir=Path("."), follow=True)
    if is_url(args.run_dir):  # output_dir on object storage: the workers fetch the newest complete checkpoint
        return _resume_remote(args)
    args.run_dir = Path(args.run_dir)
    if on_cluster:
        from launch.jobs import submit_command  # a run of a submitted job: resume it as a job on the cluster

        run_dir = args.run_dir.resolve() if args.run_dir.exists() else args.run_dir  # else: a path on the cluster
        return submit_command(["resume", str(run_dir)], args.address, working_dir=Path("."), follow=True)

    saved = args.run_dir / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(f"{args.run_dir}: not a run directory (no config.yaml)")
    run_dir = args.run_dir.resolve()
    cfg = config.load(saved, [config.string_override("name", run_dir.name),
                              config.string_override("output_dir", str(run_dir.parent))])
    return _train(cfg, resume=True, address=args.address, verbose=args.verbose)


def _resume_remote(args: argparse.Namespace) -> int:
    from trainer import config
    from trainer.remote_runs import fetch_outputs

    url = args.run_dir.rstrip("/")
    run_dir = fetch_outputs(url)  # config.yaml; the workers fetch the checkpoint, each on its own node
    cfg = config.load(run_dir / "config.yaml", [config.string_override("name", url.rsplit("/", 1)[1]),
                                                config.string_override("output_dir", url.rsplit("/", 1)[0])])
    return _train(cfg, resume=True, address=args.address, verbose=args.verbose)


def _train(cfg: Any, *, resume: bool, address: str | None, verbose: bool) -> int:
    from launch.ray_launch import launch
    from trainer.checkpoint import latest_checkpoint
    from trainer.engine.build import plan_run
    from trainer.progress import format_table
    from trainer.remote_runs import remote_of

    cfg = absolute_paths(cfg)
    on_storage = _check_remote_run(cfg, resume)  # checked there: the workers fetch what they need on their nodes
    if resume and not on_storage and latest_checkpoint(cfg.run_dir) is None:
        raise CheckpointError(f"{cfg.run_dir}: no complete checkpoint to resume from")
    if not resume and not on_storage and (cfg.run_dir / "checkpoints").exists():
        raise UserError(f"{cfg.run_dir} already holds a run: add --resume to continue it, or --set name=NEW")
    ensure_shards(cfg, address)
    plan = plan_run(cfg)
    shown = remote_of(cfg.run_dir) or str(cfg.run_dir)  # a run on object storage: its URL, not this machine's mirror
    print(f"twinscale: run {shown} — {cfg.dist.workers} workers, {plan.total_steps} steps "
          f"({plan.kind} shards, global batch {cfg.data.batch_size * cfg.dist.workers})", file=sys.stderr)
    final = launch(cfg, address=address, resume=resume, verbose=verbose)
    if "stopped_by" in final:
        import signal

        print(f"twinscale: stopped by {final['stopped_by']}; newest checkpoint {final['checkpoint']}; continue with "
              f"`twinscale resume {shown}`", file=sys.stderr)
        return 128 + signal.Signals[final["stopped_by"]].value
    print(format_table({**final, "run_dir": shown, "model": f"{shown}/model", "checkpoints": f"{shown}/checkpoints"}))
    return 0


def absolute_paths(cfg: Any) -> Any:
    """Relative data paths and `output_dir` resolved against the working directory here: Ray Train starts each
    worker in a directory of its own, so a relative path would mean nothing there.

    Absolute paths are kept as written (not resolved through symlinks): on a cluster they name each worker's own
    node, where every worker checks at start that it can read them (trainer.preflight).
    """
    from trainer.data.remote import is_url

    def absolute(path: str | None) -> str | None:
        if path is None or is_url(path) or Path(path).is_absolute():
            return path  # URLs (s3://, pipe:...) and absolute paths mean the same on every node
        if "::" in path:  # a list of shard patterns
            return "::".join(str(absolute(part.strip())) for part in path.split("::"))
        return str(Path(path).resolve())

    data = cfg.data.model_copy(update={key: absolute(getattr(cfg.data, key))
                                       for key in ("train", "test", "index", "test_index")})
    output_dir = cfg.output_dir if is_url(cfg.output_dir) else str(Path(cfg.output_dir).resolve())
    return cfg.model_copy(update={"data": data, "output_dir": output_dir})


def _check_remote_run(cfg: Any, resume: bool) -> bool:
    """A run with a URL as output_dir (True; False for a local run): the storage answers, a new run does not
    overwrite an old one, and a resumed one has a complete checkpoint there. Nothing is downloaded here: the
    driver's machine need not be a node of the run (each node's workers fetch the checkpoint themselves)."""
    from trainer.remote_runs import remote_checkpoints, remote_of

    url = remote_of(cfg.run_dir)
    if url is None:
        return False
    complete, _ = remote_checkpoints(url)  # DataError (exit 2) when unreachable or refused
    if not resume and complete:
        raise UserError(f"{url} already holds a run: continue it with `twinscale resume {url}`, or --set name=NEW")
    if resume and not complete:
        raise CheckpointError(f"{url}: no complete checkpoint to resume from")
    return True


def ensure_shards(cfg: Any, address: str | None = None) -> None:
    """Write the train/test shards from `data.source` when they are missing (the demo's first run), as
    `twinscale shards SOURCE --kind data.source_kind` would."""
    from trainer.data import remote
    from trainer.data.writer import INDEX_FILE, write_shards
    from trainer.errors import ConfigError

    if cfg.data.source is None or remote.exists(remote.join(cfg.data.train, INDEX_FILE)):
        return
    train, test = cfg.data.train, cfg.data.test
    parent = remote.parent(train)
    if train.rstrip("/").rsplit("/", 1)[-1] != "train" or (test is not None and (
            remote.parent(test) != parent or test.rstrip("/").rsplit("/", 1)[-1] != "test")):
        raise ConfigError("data.source: shards are written as DIR/train and DIR/test; point data.train and "
                          "data.test there, or write shards yourself with `twinscale shards`")
    print(f"twinscale: writing {cfg.data.source} {cfg.data.source_kind} shards to {parent}", file=sys.stderr)
    if address is not None and not remote.is_url(train):  # on object storage, every node reads what is written
        print(f"twinscale: warning: the shards are written on this node only; on a multi-node cluster set "
              f"data.train and data.test to object storage (s3://BUCKET/data/{Path(parent).name}/train) or a path "
              f"every node shares (/shared/data/{Path(parent).name}/train)", file=sys.stderr)
    write_shards(cfg.data.source, cfg.data.source_kind, parent, test_fraction=cfg.data.test_fraction,
                 seed=cfg.seed, samples_per_shard=cfg.data.samples_per_shard, pairs_per_item=cfg.data.pairs_per_item,
                 as_images=cfg.data.source_as_images)


def cmd_shards(args: argparse.Namespace) -> int:
    from trainer.data.writer import write_shards

    written = write_shards(args.source, args.kind, args.out, test_fraction=args.test_fraction, seed=args.seed,
                           samples_per_shard=args.samples_per_shard, pairs_per_item=args.pairs_per_item,
                           as_images=args.as_images, overwrite=args.overwrite, workers=args.workers,
                           pack=args.pack)
    for split, index in written.items():
        print(f"{split}: {index.num_samples} {index.kind} samples in {len(index.shards)} shards")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from trainer.data.scan import scan

    started = time.perf_counter()
    counter = None
    if args.address is not None:
        from launch.scan import ray_counter

        counter = ray_counter(None if args.address == "local" else args.address)
    index = scan(args.spec, args.out, processes=args.processes, counter=counter)
    print(f"{index['num_samples']} samples in {len(index['shards'])} shards → {args.out} "
          f"({time.perf_counter() - started:.1f} s); use it with --set data.index={args.out}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from trainer.embed import embed_to_file

    count = embed_to_file(local_model(args.model), args.input, args.out, side=args.side, batch_size=args.batch_size,
                          overrides=args.overrides)
    print(f"wrote {count} embeddings to {args.out}")
    return 0


def cmd_mine(args: argparse.Namespace) -> int:
    from trainer.mine import MiningWindow, mine_hard_negatives

    window = MiningWindow(skip_top=args.skip_top, window=args.window, per_anchor=args.per_anchor, seed=args.seed)
    stats = mine_hard_negatives(local_model(args.model), args.shards, args.out, window,
                                samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
                                overwrite=args.overwrite, overrides=args.overrides)
    print(f"mined {stats.triplets} triplets from {stats.anchors} anchors ({stats.anchors_without_negative} without a "
          f"negative in ranks [{args.skip_top}, {args.skip_top + args.window}), {stats.anchors_without_positive} "
          f"in single-item classes) → {args.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from launch.sweep import resume_sweep, start_sweep

    if (args.sweep_file is None) == (args.resume is None):
        raise UserError("sweep: give either a sweep file (twinscale sweep configs/sweeps/NAME.yaml) or "
                        "--resume SWEEP_DIR")
    if args.resume is not None:
        return resume_sweep(args.resume, args.address, args.verbose)
    return start_sweep(args.sweep_file, args.address, args.verbose)


def cmd_submit(args: argparse.Namespace) -> int:
    from launch.jobs import submit

    return submit(args.config, args.overrides, args.address, working_dir=args.working_dir, follow=args.follow,
                  pip=args.pip, image=args.image, env_names=args.env_names)


def cmd_jobs(args: argparse.Namespace) -> int:
    from launch.jobs import job_logs, list_jobs, stop_job

    if args.action == "list":
        return list_jobs(args.address)
    if args.job_id is None:
        raise UserError(f"jobs {args.action}: give the job id (see `twinscale jobs list`)")
    if args.action == "logs":
        return job_logs(args.address, args.job_id, args.follow)
    return stop_job(args.address, args.job_id)


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.embed import evaluate_exported
    from trainer.progress import format_table

    print(format_table(evaluate_exported(local_model(args.model), args.data, args.overrides)))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from launch.index_job import cmd_index as run_index

    return run_index(args)


def cmd_search(args: argparse.Namespace) -> int:
    from trainer.search import cmd_search as run_search

    return run_search(args)


def cmd_verify(args: argparse.Namespace) -> int:
    from trainer.search import cmd_verify as run_verify

    return run_verify(args)


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.models.onnx_export import cmd_export as run_export

    return run_export(args)


def cmd_report(args: argparse.Namespace) -> int:
    from trainer.report import cmd_report as run_report

    return run_report(args)


COMMANDS = {"train": cmd_train, "resume": cmd_resume, "shards": cmd_shards, "scan": cmd_scan, "embed": cmd_embed,
            "mine": cmd_mine, "eval": cmd_eval, "sweep": cmd_sweep, "submit": cmd_submit, "jobs": cmd_jobs,
            "index": cmd_index, "search": cmd_search, "verify": cmd_verify, "export": cmd_export,
            "report": cmd_report}


if __name__ == "__main__":
    sys.exit(main())
