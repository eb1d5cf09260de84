"""Foreign WebDataset shard sets: `twinscale scan` (tar headers only) against reading the shards through, and the
stream of the same set from local disk and from an S3-compatible server on loopback (moto's server mode).

    python bench/shardsets.py                      # 64 shards × 500 img2dataset-style samples
    python bench/shardsets.py --shards 256 --per-shard 1000

Each sample holds a 12 kB `jpg` (random bytes: only counted, never decoded here), a caption `txt`, a `json` with
its label and an unmapped `pth`. The stream maps `{input: txt, label: json.label}`, so it reads the caption and the
json only and skips over the image bytes; one process, data.loader_workers=0. The S3 figures are bounded by
moto's pure-Python server sharing the machine's cores, not by s3fs: read them as a floor.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path

from trainer.config import DataConfig
from trainer.data.scan import count_in_pool, scan
from trainer.data.shardsets import expand
from trainer.data.stream import eval_batches

FIELDS = {"input": "txt", "label": "json.label"}


def write_set(directory: Path, shards: int, per_shard: int) -> None:
    rng = random.Random(0)
    image = rng.randbytes(12_000)
    for shard in range(shards):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for index in range(per_shard):
                key = f"{shard * per_shard + index:09d}"
                for ext, data in (("jpg", image), ("txt", f"caption {key} w{index % 10}".encode()),
                                  ("json", json.dumps({"label": index % 10}).encode()), ("pth", b"x" * 100)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def read_through(urls: list[str]) -> int:
    """Samples counted by reading every member's bytes (what a scan without seeking would cost)."""
    count = 0
    for url in urls:
        with tarfile.open(url, "r|") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    count += 1
                handle = tar.extractfile(member)
                if handle is not None:
                    handle.read()
    return count


def stream(spec: str, index: str) -> tuple[int, float]:
    cfg = DataConfig(train=spec, test=None, fields=FIELDS, index=index, batch_size=256, loader_workers=0)
    started, samples = time.perf_counter(), 0
    for batch in eval_batches(spec, cfg, batch_size=256):
        samples += len(batch["keys"])
    return samples, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        write_set(root, args.shards, args.per_shard)
        spec = f"{root}/{{00000..{args.shards - 1:05d}}}.tar"
        urls = expand(spec)
        size = sum(os.path.getsize(url) for url in urls)
        print(f"set: {args.shards} shards, {args.shards * args.per_shard} samples, {size / 2**20:.0f} MiB")
        for name, run in (("scan, 1 process (headers)", lambda: count_in_pool(urls, 1)),
                          ("scan, 2 processes (headers)", lambda: count_in_pool(urls, 2)),
                          ("read every member through", lambda: [read_through(urls)])):
            started = time.perf_counter()
            total = sum(run())
            elapsed = time.perf_counter() - started
            print(f"{name:32s} {elapsed:7.2f} s  {total / elapsed:12,.0f} samples/s")
        scan(spec, str(root / "index.json"))
        samples, elapsed = stream(spec, str(root / "index.json"))
        print(f"{'stream, local disk':32s} {elapsed:7.2f} s  {samples / elapsed:12,.0f} samples/s")
        s3_stream(root, args.shards)


def s3_stream(root: Path, shards: int) -> None:
    from moto.server import ThreadedMotoServer

    from trainer.data import remote

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"})
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    fs, _ = remote.filesystem("s3://bench")
    fs.mkdir("bench")
    for path in sorted(root.glob("*.tar")):
        fs.put_file(str(path), f"bench/set/{path.name}")
    spec = f"s3://bench/set/{{00000..{shards - 1:05d}}}.tar"
    started = time.perf_counter()
    scan(spec, "s3://bench/set/index.json", processes=1)
    print(f"{'scan from S3, 1 process':32s} {time.perf_counter() - started:7.2f} s")
    samples, elapsed = stream(spec, "s3://bench/set/index.json")
    print(f"{'stream from S3 (moto, loopback)':32s} {elapsed:7.2f} s  {samples / elapsed:12,.0f} samples/s")
    server.stop()


if __name__ == "__main__":
    main()
