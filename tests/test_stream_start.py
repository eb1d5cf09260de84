"""The stream's performance paths change nothing a run sees: a loader started ahead (`start=True`) yields the
same batches as one started lazily, images decoded as uint8 and scaled per batch equal the per-image float
decoding, and .npy members read in place after one header parse equal `np.load`. Also the start-up timeline a
run leaves for bench/startup.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from trainer.config import DataConfig
from trainer.data.stream import decode_image, decode_npy, train_batches
from trainer.data.writer import write_shards
from trainer.progress import TIMELINE_FILE, record_timeline


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", "labeled", out, test_fraction=0.4, seed=0, as_images=True, samples_per_shard=100)
    return out / "train"


def batches(directory: Path, cfg: DataConfig, **kwargs: int | bool) -> list[dict]:
    return list(train_batches(directory, cfg, seed=3, epoch=1, rank=1, world_size=2, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_started_ahead_yields_the_same_batches(digit_images: Path, loader_workers: int) -> None:
    cfg = DataConfig(train=str(digit_images), test=None, batch_size=32, loader_workers=loader_workers)
    lazy, ahead = batches(digit_images, cfg), batches(digit_images, cfg, start=True)
    assert len(lazy) == len(ahead) > 0
    for one, other in zip(lazy, ahead, strict=True):
        assert one["keys"] == other["keys"]
        assert torch.equal(one["views"]["input"], other["views"]["input"])
        assert torch.equal(one["labels"]["input"], other["labels"]["input"])
    skipped = batches(digit_images, cfg, start=True, skip_batches=2)
    assert [b["keys"] for b in skipped] == [b["keys"] for b in lazy[2:]]


UNFINISHED = """
import multiprocessing, sys
from trainer.config import DataConfig
from trainer.data.stream import train_batches

def keep_streams(directory):
    cfg = DataConfig(train=directory, test=None, batch_size=32, loader_workers=1)
    global kept  # epoch 1's loader is forked while epoch 0's runs
    kept = [train_batches(directory, cfg, seed=0, epoch=e, rank=0, world_size=1, start=True) for e in (0, 1)]
    print(len(next(kept[0])["keys"]), flush=True)

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=keep_streams, args=(sys.argv[1],))
    child.start()
    child.join()
    print("child", child.exitcode, flush=True)
    keep_streams(sys.argv[1])
"""


def test_process_exits_with_an_unfinished_stream(digit_images: Path, tmp_path: Path) -> None:
    # Loader workers ignore SIGTERM (a run saves before its workers may go), and multiprocessing's exit handler
    # stops daemonic children with SIGTERM and then joins them: without the stream's own finalizer, a process
    # leaving a stream unfinished (a benchmark, a script, a multiprocessing child) would wait for ever at exit.
    script = tmp_path / "unfinished.py"
    script.write_text(UNFINISHED)
    done = subprocess.run([sys.executable, str(script), str(digit_images)], capture_output=True, text=True,
                          timeout=90, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["32", "child", "0", "32"]
    assert "Traceback" not in done.stderr


def test_image_batches_equal_per_image_float_decoding(digit_images: Path) -> None:
    cfg = DataConfig(train=str(digit_images), test=None, batch_size=32, loader_workers=0)
    raw = {s["__key__"]: s["input.png"] for s in wds.DataPipeline(
        wds.SimpleShardList(sorted(str(p) for p in digit_images.glob("*.tar"))), wds.tarfile_to_samples())}
    batch = batches(digit_images, cfg)[0]
    pixels = batch["views"]["input"]
    assert pixels.dtype == torch.float32 and pixels.shape == (32, 1, 8, 8)
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0 and float(pixels.max()) > 0.5
    expected = np.stack([decode_image(raw[key], 1) for key in batch["keys"]])
    assert np.array_equal(pixels.numpy(), expected)


def test_timeline_marks_merge(tmp_path: Path) -> None:
    record_timeline(tmp_path, {"worker_start": 1.0, "first_step": 2.5})
    record_timeline(tmp_path, {"launch": 0.5, "first_step": 3.0})
    assert json.loads((tmp_path / TIMELINE_FILE).read_text()) == {"worker_start": 1.0, "first_step": 3.0,
                                                                  "launch": 0.5}


def npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("version", [None, (1, 0), (2, 0), (3, 0)])
def test_npy_decoding_equals_numpy(version: tuple[int, int] | None) -> None:
    arrays = [np.arange(16, dtype=np.float32), np.random.default_rng(0).random((3, 4)), np.arange(12).reshape(3, 4),
              np.array([True, False]), np.asfortranarray(np.arange(15.0).reshape(3, 5)), np.ones(()),
              np.zeros((0, 4), np.float32), np.arange(6, dtype=">i4").reshape(2, 3)]
    for array in arrays:
        decoded, expected = decode_npy(npy(array, version)), np.load(io.BytesIO(npy(array, version))).astype(np.float32)
        assert decoded.dtype == np.float32 and decoded.shape == expected.shape and decoded.flags.writeable
        assert np.array_equal(decoded, expected)


@pytest.mark.parametrize("data", [npy(np.array(["a", 1], dtype=object)), npy(np.arange(4))[:-3], npy(np.array(["ab"]))],
                         ids=["object", "truncated", "text"])
def test_npy_decoding_rejects_what_numpy_rejects(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_npy(data)
