"""Broken and hostile shard input (item 5), beyond what tests/test_stream.py and tests/test_shards.py cover:
members carrying pickles (.pth, .pkl, a pickle posing as .npy) are never executed, complex or text arrays and
labels of the wrong type are corrupt samples (skipped and counted, or an error naming the shard), shards that
are all garbage end in an error instead of a hang, and an empty or sample-less shard list is rejected before
training.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from trainer.config import DataConfig
from trainer.data.formats import INDEX_FILE, ShardIndex, ShardInfo, ViewSpec, read_index, write_index
from trainer.data.stream import epoch_plan, eval_batches, train_batches
from trainer.errors import DataError

DIM = 4


class CreatesFile:
    """Unpickling this creates a file: proof that nothing in the stream unpickles shard data."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def sample(number: int, **members: bytes) -> dict[str, bytes | str]:
    return {"__key__": f"s{number:05d}", "input.npy": npy(np.full(DIM, number, np.float32)),
            "cls": str(number % 3).encode(), **members}


def write_shards(directory: Path, shards: list[list[dict]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    infos = []
    for position, samples in enumerate(shards):
        name = f"shard-{position:06d}.tar"
        with wds.TarWriter(str(directory / name), encoder=False) as tar:
            for item in samples:
                tar.write(item)
        infos.append(ShardInfo(name, len(samples)))
    write_index(directory, ShardIndex(kind="labeled", views={"input": ViewSpec("npy", (DIM,))}, labels=True,
                                      num_classes=3, shards=tuple(infos), source="test"))


def hostile_samples(marker: Path) -> dict[str, dict[str, bytes | str]]:
    torch_pickle = io.BytesIO()
    torch.save({"payload": CreatesFile(marker)}, torch_pickle)
    return {
        "pth_member": sample(900, **{"input.pth": torch_pickle.getvalue(), "model.pth": torch_pickle.getvalue()}),
        "pickle_as_npy": sample(901, **{"input.npy": pickle.dumps(CreatesFile(marker))}),
        "complex_npy": sample(902, **{"input.npy": npy(np.ones(DIM, np.complex64))}),
        "text_npy": sample(903, **{"input.npy": npy(np.array(["a", "b", "c", "d"]))}),
        "float_label": sample(904, cls=b"1.5"),
        "empty_label": sample(905, cls=b""),
        "binary_label": sample(906, cls=b"\xff\xfe"),
    }


def test_hostile_members_are_skipped_counted_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    hostile = hostile_samples(marker)
    write_shards(tmp_path / "shards", [[sample(i) for i in range(20)] + list(hostile.values())])
    batches = list(eval_batches(tmp_path / "shards", DataConfig(on_corrupt="skip"), batch_size=8))
    seen = {key for batch in batches for key in batch["keys"]}
    assert "s00900" in seen  # the .pth members are not declared: ignored, the sample itself is fine
    assert not {"s00901", "s00902", "s00903", "s00904", "s00905", "s00906"} & seen
    assert batches[-1]["corrupt"] == 6
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pickle_as_npy", "complex_npy", "text_npy", "float_label", "binary_label"])
def test_hostile_members_raise_naming_the_shard_when_asked(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "executed"
    bad = hostile_samples(marker)[name]
    write_shards(tmp_path / "shards", [[sample(i) for i in range(8)] + [bad]])
    with pytest.raises(DataError, match=rf"shard-000000.tar: sample {bad['__key__']}: .*data.on_corrupt=skip"):
        list(eval_batches(tmp_path / "shards", DataConfig(on_corrupt="raise"), batch_size=4))
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_shards_that_are_all_garbage_fail_instead_of_hanging(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", [[sample(i) for i in range(16)], [sample(100 + i) for i in range(16)]])
    for tar in (tmp_path / "shards").glob("*.tar"):
        tar.write_bytes(b"\x00garbage" * 1000)
    cfg = DataConfig(batch_size=4, loader_workers=2, on_corrupt="skip")
    with pytest.raises(DataError, match=r"no full batch could be decoded; check the shards"):
        list(train_batches(tmp_path / "shards", cfg, seed=0, epoch=0, rank=0, world_size=1))


def test_empty_and_sample_less_shard_lists_are_rejected_before_training(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", [[sample(i) for i in range(8)]])
    raw = json.loads((tmp_path / "shards" / INDEX_FILE).read_text())
    (tmp_path / "shards" / INDEX_FILE).write_text(json.dumps({**raw, "shards": [], "num_samples": 0}))
    with pytest.raises(DataError, match=r"index.json: invalid shard index: no shards listed"):
        read_index(tmp_path / "shards")
    write_shards(tmp_path / "none", [[]])
    with pytest.raises(DataError, match=r"none: 1 shard\(s\) of 0 samples cannot give .* a full batch"):
        epoch_plan(tmp_path / "none", DataConfig(batch_size=4), seed=0, epoch=0, world_size=1)


def png(height: int, width: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((height, width), 128, np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def with_header_size(data: bytes, height: int, width: int) -> bytes:
    """A PNG whose IHDR chunk declares height × width (CRC fixed up), its pixel data left as it was."""
    import struct
    import zlib

    assert data[12:16] == b"IHDR"
    header = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + header + struct.pack(">I", zlib.crc32(header)) + data[33:]


def image_shards(directory: Path, extra: list[dict]) -> None:
    directory.mkdir(parents=True)
    samples = [{"__key__": f"s{i:05d}", "input.png": png(8, 8), "cls": str(i % 3).encode()} for i in range(12)]
    with wds.TarWriter(str(directory / "shard-000000.tar"), encoder=False) as tar:
        for item in samples + extra:
            tar.write(item)
    write_index(directory, ShardIndex(kind="labeled", views={"input": ViewSpec("png", (1, 8, 8))}, labels=True,
                                      num_classes=3, shards=(ShardInfo("shard-000000.tar", len(samples) + len(extra)),),
                                      source="test"))


HOSTILE_IMAGES = {
    # a valid 16x16 image where index.json declares 8x8: refused from its header, before decoding
    "wrong_size": png(16, 16),
    # 8x8 pixel data under a header declaring 16x16: decoding it would fail differently (truncated data)
    "lying_header": with_header_size(png(8, 8), 16, 16),
    # ~100 Mpixels declared in a few bytes: above Pillow's limit, where Pillow itself only warns and would decode
    "bomb_warned": with_header_size(png(8, 8), 10_000, 10_000),
    # ~10 Gpixels: Pillow's own DecompressionBombError, a corrupt sample like any other, not a crash
    "bomb_refused": with_header_size(png(8, 8), 100_000, 100_000),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_IMAGES))
def test_image_size_is_checked_from_the_header_before_decoding(tmp_path: Path, name: str) -> None:
    bad = {"__key__": "s00999", "input.png": HOSTILE_IMAGES[name], "cls": b"1"}
    image_shards(tmp_path / "shards", [bad])
    batches = list(eval_batches(tmp_path / "shards", DataConfig(on_corrupt="skip", loader_workers=0), batch_size=4))
    assert "s00999" not in {key for batch in batches for key in batch["keys"]}
    assert batches[-1]["corrupt"] == 1
    expected = {"wrong_size": "header size 16x16 differs from index.json 8x8",
                "lying_header": "header size 16x16 differs from index.json 8x8",
                "bomb_warned": "header size 10000x10000 differs from index.json 8x8",
                "bomb_refused": "DecompressionBombError"}[name]
    with pytest.raises(DataError, match=rf"sample s00999: input.png: cannot decode \(.*{expected}"):
        list(eval_batches(tmp_path / "shards", DataConfig(on_corrupt="raise", loader_workers=0), batch_size=4))


def test_bomb_limit_holds_without_an_index_size_and_for_declared_shapes(tmp_path: Path) -> None:
    from trainer.data.stream import decode_pixels

    with pytest.raises(ValueError, match="exceeds the decompression-bomb limit"):
        decode_pixels(HOSTILE_IMAGES["bomb_warned"], 1)  # no declared size (e.g. `twinscale embed`)
    image_shards(tmp_path / "shards", [])
    raw = json.loads((tmp_path / "shards" / INDEX_FILE).read_text())
    raw["views"]["input"]["shape"] = [1, 20_000, 20_000]
    (tmp_path / "shards" / INDEX_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"image shape \[1, 20000, 20000\] has more than 89478485 pixels"):
        read_index(tmp_path / "shards")
