"""Samples/s of the shard stream alone (read + decode + batch) against what training consumes, JPEG photos through
the train transforms against Pillow's decode-and-resize alone, and a large synthetic shard set streamed end to end
to show that memory stays flat.

    python bench/data.py                       # digits images and vectors, JPEGs, plus 1,000,000 synthetic samples
    python bench/data.py --large 0             # skip the large set
    python bench/data.py --large 0 --jpegs 0 --recipes vectors --repeats 3

Per recipe (the default demo: digits as 8x8 PNGs; configs/digits_vectors.yaml: 64-d npy vectors):

- stream, in-process stages: µs per sample of reading the tar members, of reading + decoding, and of the whole
  pipeline (read + shuffle + decode + batch) with `data.loader_workers=0`, over rank 0's shards of a 2-worker run.
- stream per DataLoader worker: `train_batches` as a run calls it (rank 0 of 2, one DataLoader worker, each
  epoch's stream opened when the previous epoch begins), samples/s over the recipe's epochs (optim.epochs, or
  `--epochs`), in variants side by side: a new loader per epoch (`persistent=False`, the stream before
  persistent workers), persistent loader workers, and for vectors the same samples written packed
  (`twinscale shards --pack 64`).
- training consumption: samples/s one worker's training step takes (Twinscale's step on batches already in
  memory, one process, the recipe's thread count), so the ratio says how many times over one loader worker
  could feed one training worker. Target: >= 5.

The figures alternate stream variants / training per repeat and report medians.

JPEGs (`--jpegs N`, 0 skips): N photos-like JPEGs of 320x240 (smooth noise, quality 90) in an image folder,
written as labeled shards (original bytes); samples/s of the stream with ImagePreprocessor(224) in training mode
(random resized crop + flip, normalised batches of 32; one persistent loader worker, two epochs) against
Pillow's open + draft + convert + resize to 224x224 of the same bytes in one process. Target: within 1.3x.

The large set (`--large N` samples of
16-d vectors in shards of 10,000, written once under --work) is streamed once with two DataLoader workers while
the resident memory of this process and its workers is sampled.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

RECIPES = {"images": REPO / "configs" / "default.yaml", "vectors": REPO / "configs" / "digits_vectors.yaml"}


def per_sample_us(seconds: float, samples: int) -> float:
    return seconds / max(1, samples) * 1e6


def stage_timings(cfg: Any) -> dict[str, float]:
    """µs/sample of the in-process stages over rank 0's shards (2 workers, epoch 0)."""
    import webdataset as wds

    from trainer.data.formats import read_index
    from trainer.data.preprocess import default_preprocessors
    from trainer.data.stream import SampleDecoder, _DeclaredMembers, _WorkerState, plan_epoch, train_batches

    index = read_index(cfg.data.train)
    plan = plan_epoch(index, seed=cfg.seed, epoch=0, world_size=2, loader_workers=1, batch_size=cfg.data.batch_size)
    urls = [str(Path(cfg.data.train) / file) for file in plan.slots[0][0]]
    read = wds.DataPipeline(wds.SimpleShardList(urls),
                            wds.tarfile_to_samples(select_files=_DeclaredMembers(index.members())))
    started = time.perf_counter()
    raw = list(read)
    read_s = time.perf_counter() - started
    decoder = SampleDecoder(index, default_preprocessors(index, cfg.data), _WorkerState(cfg.data.on_corrupt))
    started = time.perf_counter()
    for sample in raw:
        decoder(sample)
    decode_s = time.perf_counter() - started
    data = cfg.data.model_copy(update={"loader_workers": 0})
    started, count = time.perf_counter(), 0
    for batch in train_batches(cfg.data.train, data, seed=cfg.seed, epoch=0, rank=0, world_size=2):
        count += len(batch["keys"])
    pipeline_s = time.perf_counter() - started
    return {"read": per_sample_us(read_s, len(raw)), "decode": per_sample_us(decode_s, len(raw)),
            "pipeline": per_sample_us(pipeline_s, count)}


def stream_rate(cfg: Any, train: str, epochs: int, first_epoch: int, persistent: bool) -> float:
    """Samples/s of rank 0 of 2 with the recipe's DataLoader workers, over consecutive epochs, each epoch's stream
    opened when the previous epoch begins (as TrainLoop.run does)."""
    from trainer.data.stream import train_batches

    data = cfg.data.model_copy(update={"train": train})

    def epoch_batches(epoch: int, start: bool) -> Any:
        return train_batches(train, data, seed=cfg.seed, epoch=epoch, rank=0, world_size=2, start=start,
                             persistent=persistent)

    started, count, upcoming = time.perf_counter(), 0, None
    for epoch in range(first_epoch, first_epoch + epochs):
        batches = upcoming or epoch_batches(epoch, start=False)
        upcoming = epoch_batches(epoch + 1, start=True) if epoch + 1 < first_epoch + epochs else None
        for batch in batches:
            count += len(batch["keys"])
    return count / (time.perf_counter() - started)


def packed_copy(cfg: Any, work: Path, pack: int) -> str | None:
    """The recipe's training split written again with `--pack` (same source, seed and split), or None for images."""
    from trainer.data.formats import read_index
    from trainer.data.writer import shards_exist, write_shards

    if any(spec.ext != "npy" for spec in read_index(cfg.data.train).views.values()):
        return None
    out = work / f"{Path(cfg.data.train).parent.name}-pack{pack}"
    if not shards_exist(out / "train"):
        write_shards(str(cfg.data.source), "labeled", out, test_fraction=cfg.data.test_fraction, seed=cfg.seed,
                     samples_per_shard=cfg.data.samples_per_shard, overwrite=True, pack=pack)
    return str(out / "train")


class TrainingConsumer:
    """Twinscale's step path of one worker on batches already in memory: what a training worker consumes."""

    def __init__(self, cfg: Any) -> None:
        from throughput import TwinscaleSteps

        from trainer.engine.build import plan_run

        plan = plan_run(cfg, 1)
        self.steps = TwinscaleSteps(cfg, plan, 0, 1, Path(tempfile.mkdtemp(prefix="bench-data-")), cached=True)
        self.batches = self.steps.held
        for batch in self.batches:
            self.steps.loop._step(batch, self.steps.state)  # warm-up

    def rate(self, steps: int) -> float:
        started = time.perf_counter()
        for batch in itertools.islice(itertools.cycle(self.batches), steps):
            self.steps.loop._step(batch, self.steps.state)
        return steps * len(self.batches[0]["keys"]) / (time.perf_counter() - started)


def compare(name: str, cfg: Any, args: argparse.Namespace) -> None:
    stages = [stage_timings(cfg) for _ in range(args.repeats)]
    shown = ", ".join(f"{key} {statistics.median(s[key] for s in stages):.0f}" for key in stages[0])
    print(f"{name}: in-process µs/sample, unpacked shards (median of {args.repeats}): {shown}")
    epochs = args.epochs or cfg.optim.epochs
    variants = {"a loader per epoch": (cfg.data.train, False), "persistent workers": (cfg.data.train, True)}
    packed = packed_copy(cfg, args.work, 64)
    if packed is not None:
        variants["packed, a loader per epoch"] = (packed, False)
        variants["packed, persistent workers"] = (packed, True)
    consumer = TrainingConsumer(cfg)
    stream: dict[str, list[float]] = {variant: [] for variant in variants}
    training = []
    for repeat in range(args.repeats):
        for variant, (train, persistent) in variants.items():
            stream[variant].append(stream_rate(cfg, train, epochs, repeat * epochs, persistent))
        training.append(consumer.rate(args.steps))
        shown = ", ".join(f"{variant} {rates[-1]:.0f}" for variant, rates in stream.items())
        print(f"  {name} repeat {repeat}: stream samples/s per loader worker: {shown}; training {training[-1]:.0f} "
              f"samples/s per worker", flush=True)
    print(f"{name}: training {statistics.median(training):.0f} samples/s per worker; stream over {epochs} epochs, "
          f"{cfg.data.loader_workers} loader worker per training worker:")
    for variant, rates in stream.items():
        ratios = [rate / consumed for rate, consumed in zip(rates, training, strict=True)]
        print(f"  {variant:28s} {statistics.median(rates):7.0f} samples/s per loader worker, ratio median "
              f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


# --- JPEG photos through the train transforms -------------------------------------------------------------------

def write_jpegs(directory: Path, count: int) -> Path:
    """`count` 320x240 JPEGs in 4 class folders (smooth noise, so they compress like photos), then their shards."""
    from PIL import Image

    from trainer.data.writer import shards_exist, write_shards

    shards = directory / "shards"
    if shards_exist(shards):
        return shards
    rng = np.random.default_rng(0)
    for number in range(count):
        folder = directory / "photos" / f"class{number % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((320, 240), Image.Resampling.BICUBIC)
        image.save(folder / f"{number:05d}.jpg", quality=90)
    write_shards(str(directory / "photos"), "labeled", shards, samples_per_shard=64, overwrite=True)
    return shards


def pillow_rate(shards: Path, size: int) -> float:
    """Samples/s of Pillow alone on the shards' JPEG bytes: open, draft, convert to RGB, resize to size x size."""
    import io
    import tarfile

    from PIL import Image

    photos = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            photos += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]  # type: ignore[union-attr]
    started = time.perf_counter()
    for data in photos:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))
            np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return len(photos) / (time.perf_counter() - started)


def jpeg_stream_rate(shards: Path, size: int, first_epoch: int) -> float:
    """Samples/s of the training stream of the JPEG shards, ImagePreprocessor(size), one persistent loader worker."""
    from trainer.config import DataConfig
    from trainer.data.stream import train_batches
    from trainer.data.transforms import ImagePreprocessor

    data = DataConfig(train=str(shards), test=None, batch_size=32, loader_workers=1)
    preprocessors = {"input": ImagePreprocessor(size, view="input")}
    started, count, upcoming = time.perf_counter(), 0, None
    for epoch in range(first_epoch, first_epoch + 2):
        batches = upcoming or train_batches(shards, data, seed=0, epoch=epoch, rank=0, world_size=1,
                                            preprocessors=preprocessors)
        upcoming = train_batches(shards, data, seed=0, epoch=epoch + 1, rank=0, world_size=1, start=True,
                                 preprocessors=preprocessors) if epoch == first_epoch else None
        for batch in batches:
            count += len(batch["keys"])
    return count / (time.perf_counter() - started)


def compare_jpegs(args: argparse.Namespace) -> None:
    shards = write_jpegs(args.work / f"jpegs-{args.jpegs}", args.jpegs)
    stream, pillow = [], []
    for repeat in range(args.repeats):
        stream.append(jpeg_stream_rate(shards, 224, 2 * repeat))
        pillow.append(pillow_rate(shards, 224))
        print(f"  jpegs repeat {repeat}: stream {stream[-1]:.0f} samples/s per loader worker, Pillow decode+resize "
              f"{pillow[-1]:.0f} samples/s, Pillow/stream {pillow[-1] / stream[-1]:.2f}", flush=True)
    ratios = [p / s for p, s in zip(pillow, stream, strict=True)]
    print(f"jpegs (320x240 → 224, train transforms): stream {statistics.median(stream):.0f} samples/s per loader "
          f"worker, Pillow decode+resize alone {statistics.median(pillow):.0f} samples/s; Pillow/stream median "
          f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); target ≤ 1.3")


# --- the large synthetic set ---------------------------------------------------------------------------------

def write_large(directory: Path, samples: int, per_shard: int, dim: int, classes: int) -> None:
    """`samples` labeled 16-d vectors in shards of `per_shard`, written with WebDataset's TarWriter."""
    import webdataset as wds

    from trainer.data.formats import SHARD_PATTERN, ShardIndex, ShardInfo, ViewSpec, read_index, write_index
    from trainer.data.sources import encode_npy

    if (directory / "index.json").is_file() and read_index(directory).num_samples == samples:
        return
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    header = encode_npy(np.zeros(dim, np.float32))[:-dim * 4]  # the .npy header is the same for every vector
    shards, started = [], time.perf_counter()
    for number, start in enumerate(range(0, samples, per_shard)):
        count = min(per_shard, samples - start)
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        labels = rng.integers(0, classes, count)
        name = SHARD_PATTERN.format(number)
        with wds.TarWriter(str(directory / name), encoder=False, mtime=0) as writer:
            for i in range(count):
                writer.write({"__key__": f"{start + i:09d}", "input.npy": header + vectors[i].tobytes(),
                              "cls": str(int(labels[i])).encode()})
        shards.append(ShardInfo(name, count))
    write_index(directory, ShardIndex(kind="labeled", views={"input": ViewSpec("npy", (dim,))}, labels=True,
                                      num_classes=classes, shards=tuple(shards), source="synthetic"))
    print(f"large: wrote {samples} samples in {len(shards)} shards in {time.perf_counter() - started:.0f} s")


def resident_mb() -> float:
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def stream_large(directory: Path, loader_workers: int, batch_size: int) -> None:
    from trainer.config import DataConfig
    from trainer.data.stream import train_batches

    cfg = DataConfig(train=str(directory), test=None, batch_size=batch_size, loader_workers=loader_workers)
    samples, started, readings = 0, time.perf_counter(), []
    every = 100_000
    for batch in train_batches(directory, cfg, seed=0, epoch=0, rank=0, world_size=1):
        samples += len(batch["keys"])
        if samples // every != (samples - len(batch["keys"])) // every:
            readings.append(resident_mb())
            print(f"  large: {samples:9d} samples, {samples / (time.perf_counter() - started):6.0f} samples/s, "
                  f"resident {readings[-1]:6.0f} MB (this process + loader workers)", flush=True)
    seconds = time.perf_counter() - started
    print(f"large: streamed {samples} samples in {seconds:.0f} s ({samples / seconds:.0f} samples/s with "
          f"{loader_workers} loader workers); resident memory first {readings[0]:.0f} MB, "
          f"max {max(readings):.0f} MB, last {readings[-1]:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", choices=sorted(RECIPES), default=["images", "vectors"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=0, help="epochs streamed per repeat (0: the recipe's)")
    parser.add_argument("--jpegs", type=int, default=512, help="JPEGs of the image-transform comparison (0: skip)")
    parser.add_argument("--steps", type=int, default=40, help="training steps timed per repeat")
    parser.add_argument("--large", type=int, default=1_000_000, help="samples of the synthetic set (0: skip)")
    parser.add_argument("--large-workers", type=int, default=2, help="DataLoader workers streaming the large set")
    parser.add_argument("--work", type=Path, default=Path("bench-work"), help="where shards are written")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from throughput import free_port, prepare_config

    os.environ["MASTER_PORT"] = str(free_port())
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for name in args.recipes:
        cfg = prepare_config(RECIPES[name], [], 2, args.work)
        torch.set_num_threads(cfg.dist.cpus_per_worker)
        compare(name, cfg, args)
    if args.jpegs:
        compare_jpegs(args)
    if args.large:
        directory = args.work / f"synthetic-{args.large}"
        write_large(directory, args.large, per_shard=10_000, dim=16, classes=1000)
        stream_large(directory, args.large_workers, batch_size=256)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
