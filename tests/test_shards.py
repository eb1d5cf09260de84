"""Shard writing: every source and kind round-trips through real tar files and index.json.

Tars are read back with the standard library's tarfile, independently of the stream, so a writer bug cannot
hide behind a matching reader bug.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from launch import cli
from trainer.data import writer
from trainer.data.formats import INDEX_FILE, ShardIndex, ViewSpec, read_index
from trainer.data.writer import shards_exist, write_shards
from trainer.errors import DataError

DIGITS = load_digits()


def read_tars(directory: Path, index: ShardIndex) -> dict[str, dict[str, bytes]]:
    """All samples of a shard set as {key: {member suffix: bytes}}, checking each shard's count."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in index.shards:
        keys_here = set()
        with tarfile.open(directory / shard.file) as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
                keys_here.add(key)
        assert len(keys_here) == shard.samples, shard
    assert len(samples) == index.num_samples
    return samples


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def make_image_folder(root: Path, counts: dict[str, int], *, size: tuple[int, int] = (6, 5), mode: str = "RGB",
                      suffix: str = ".png") -> Path:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / name / f"img{i}{suffix}")
    return root


def test_digits_vectors_round_trip(tmp_path: Path) -> None:
    indexes = write_shards("digits", "labeled", tmp_path / "out", samples_per_shard=500, seed=3)
    index = indexes["all"]
    assert read_index(tmp_path / "out") == index
    assert [s.samples for s in index.shards] == [500, 500, 500, 297]
    assert index.views == {"input": ViewSpec("npy", (64,))} and index.num_classes == 10 and index.labels
    samples = read_tars(tmp_path / "out", index)
    assert sorted(int(key) for key in samples) == list(range(1797))
    for key in ["00000000", "00000042", "00001796"]:
        vector = decode_npy(samples[key]["input.npy"])
        assert vector.dtype == np.float32 and vector.shape == (64,)
        np.testing.assert_allclose(vector, DIGITS.data[int(key)] / 16.0, rtol=1e-6)
        assert int(samples[key]["cls"]) == DIGITS.target[int(key)]
    assert json.loads((tmp_path / "out" / INDEX_FILE).read_text())["num_samples"] == 1797
    assert shards_exist(tmp_path / "out") and not shards_exist(tmp_path)


def test_digits_images_round_trip(tmp_path: Path) -> None:
    index = write_shards("digits", "labeled", tmp_path / "img", as_images=True, samples_per_shard=1000)["all"]
    assert index.views["input"] == ViewSpec("png", (1, 8, 8))
    samples = read_tars(tmp_path / "img", index)
    image = Image.open(io.BytesIO(samples["00000007"]["input.png"]))
    assert image.mode == "L" and image.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(image), np.rint(DIGITS.images[7] * 255 / 16).astype(np.uint8))


def test_image_folder_keeps_bytes_and_sorted_class_ids(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "photos", {"dog": 3, "cat": 4})
    index = write_shards(str(root), "labeled", tmp_path / "out", samples_per_shard=3)["all"]
    assert index.views["input"] == ViewSpec("png", (3, 5, 6)) and index.num_classes == 2
    samples = read_tars(tmp_path / "out", index)
    originals = {p.read_bytes(): 0 if p.parent.name == "cat" else 1 for p in root.glob("*/*.png")}
    assert {s["input.png"]: int(s["cls"]) for s in samples.values()} == originals


def test_image_folder_gray_and_mixed_formats(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "gray", {"a": 2, "b": 2}, mode="L", suffix=".jpeg")
    index = write_shards(str(root), "labeled", tmp_path / "out1")["all"]
    assert index.views["input"] == ViewSpec("jpg", (1, 5, 6))
    assert all("input.jpg" in s for s in read_tars(tmp_path / "out1", index).values())
    Image.new("L", (6, 5)).save(root / "a" / "extra.png")
    index = write_shards(str(root), "pairs", tmp_path / "out2")["all"]
    # A mixed folder keeps every file's bytes and extension: the most common first, the others as alternatives.
    assert index.views["a"] == ViewSpec("jpg", (1, 5, 6), ("png",))
    members = [s.get("a.png", s.get("a.jpg")) for s in read_tars(tmp_path / "out2", index).values()]
    assert (root / "a" / "extra.png").read_bytes() in members


def test_csv_pairs_written_as_given(tmp_path: Path) -> None:
    source = tmp_path / "pairs.csv"
    source.write_text('a,b,similar,a_label,b_label\nred apple,green apple,1,0,0\n"car, fast",a boat,0,1,2\n'
                      "x,y,true,3,3\n")
    index = write_shards(str(source), "pairs", tmp_path / "out")["all"]
    assert index.kind == "pairs" and index.labels and index.num_classes == 4
    assert index.views == {"a": ViewSpec("txt", None), "b": ViewSpec("txt", None)}
    samples = read_tars(tmp_path / "out", index)
    rows = sorted((s["a.txt"].decode(), s["b.txt"].decode(), s["similar"], s["a.cls"], s["b.cls"])
                  for s in samples.values())
    assert rows == [("car, fast", "a boat", b"0", b"1", b"2"), ("red apple", "green apple", b"1", b"0", b"0"),
                    ("x", "y", b"1", b"3", b"3")]


def test_jsonl_triplets_written_as_given(tmp_path: Path) -> None:
    source = tmp_path / "triplets.jsonl"
    rows = [{"anchor": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"} for i in range(5)]
    source.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    index = write_shards(str(source), "triplets", tmp_path / "out", samples_per_shard=2)["all"]
    assert [s.samples for s in index.shards] == [2, 2, 1] and not index.labels and index.num_classes is None
    samples = read_tars(tmp_path / "out", index)
    assert sorted(s["anchor.txt"] + s["positive.txt"] + s["negative.txt"] for s in samples.values()) == \
        sorted(f"q{i}p{i}n{i}".encode() for i in range(5))
    assert not any("anchor.cls" in s for s in samples.values())


def _pair_rows(out: Path) -> list[tuple[str, str, bytes]]:
    index = read_index(out)
    return sorted((s["a.txt"].decode(), s["b.txt"].decode(), s["similar"]) for s in read_tars(out, index).values())


def test_anchor_positive_columns_are_similar_pairs(tmp_path: Path) -> None:
    """sentence-transformers' and CLIP's layout, no `similar` column: `twinscale shards` writes similar pairs."""
    (tmp_path / "pairs.csv").write_text('anchor,positive\nhow old is the sun,4.6 billion years\n"a, b",c\n')
    assert cli.main(["shards", str(tmp_path / "pairs.csv"), "--kind", "pairs", "--out", str(tmp_path / "csv")]) == 0
    assert _pair_rows(tmp_path / "csv") == [("a, b", "c", b"1"), ("how old is the sun", "4.6 billion years", b"1")]
    rows = [{"anchor": "q1", "positive": "d1", "anchor_label": 0, "positive_label": 0},
            {"anchor": "q2", "positive": "d2", "anchor_label": 1, "positive_label": 1}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli.main(["shards", str(tmp_path / "pairs.jsonl"), "--kind", "pairs", "--out", str(tmp_path / "j")]) == 0
    index = read_index(tmp_path / "j")
    assert index.kind == "pairs" and index.labels and index.num_classes == 2
    assert _pair_rows(tmp_path / "j") == [("q1", "d1", b"1"), ("q2", "d2", b"1")]
    assert cli.main(["shards", str(tmp_path / "pairs.csv"), "--kind", "triplets", "--out", str(tmp_path / "t")]) == 2


def test_image_text_tables_keep_image_bytes_and_captions(tmp_path: Path) -> None:
    """`image,caption` (paths relative to the table, any sizes and formats): image view a, text view b, similar."""
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    sizes = {"photos/red.png": (9, 4), "photos/sub/blue.jpg": (3, 7), "photos/green.png": (5, 5)}
    for name, size in sizes.items():
        Image.new("RGB", size, color=name.rsplit("/", 1)[-1].split(".")[0]).save(tmp_path / name)
    lines = [f"{name},a {name.rsplit('/', 1)[-1].split('.')[0]} square" for name in sizes]
    (tmp_path / "captions.csv").write_text("image,caption\n" + "\n".join(lines) + "\n")
    assert cli.main(["shards", str(tmp_path / "captions.csv"), "--kind", "pairs", "--out", str(tmp_path / "s")]) == 0
    index = read_index(tmp_path / "s")
    assert index.kind == "pairs" and not index.labels
    assert index.views["a"] == ViewSpec("png", (3,), ("jpg",)) and index.views["b"] == ViewSpec("txt", None)
    samples = read_tars(tmp_path / "s", index)
    by_caption = {s["b.txt"].decode(): s for s in samples.values()}
    assert set(by_caption) == {"a red square", "a blue square", "a green square"}
    assert by_caption["a blue square"]["a.jpg"] == (tmp_path / "photos/sub/blue.jpg").read_bytes()  # original bytes
    assert all(s["similar"] == b"1" for s in samples.values())
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "photos/missing.png", "text": "x"}) + "\n")
    assert cli.main(["shards", str(tmp_path / "bad.jsonl"), "--kind", "pairs", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


def test_anchor_positive_negative_columns_as_triplets_or_pairs(tmp_path: Path) -> None:
    """Triplet columns write triplets, or as pairs a similar (anchor, positive) and a dissimilar (anchor,
    negative) pair per row, both in the same split (a row's split is a seeded hash of its anchor: about half here)."""
    rows = [{"anchor": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"} for i in range(40)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = "anchor,positive,negative\n" + "".join(f"q{i},p{i},n{i}\n" for i in range(6))
    (tmp_path / "t.csv").write_text(lines)
    assert cli.main(["shards", str(tmp_path / "t.csv"), "--kind", "triplets", "--out", str(tmp_path / "tr")]) == 0
    assert read_index(tmp_path / "tr").kind == "triplets" and read_index(tmp_path / "tr").num_samples == 6
    assert cli.main(["shards", str(tmp_path / "t.jsonl"), "--kind", "pairs", "--out", str(tmp_path / "pairs"),
                     "--test-fraction", "0.5"]) == 0
    splits = {split: _pair_rows(tmp_path / "pairs" / split) for split in ("train", "test")}
    assert sorted(splits["train"] + splits["test"]) == sorted(
        [(f"q{i}", f"p{i}", b"1") for i in range(40)] + [(f"q{i}", f"n{i}", b"0") for i in range(40)])
    for rows_of_split in splits.values():
        anchors = Counter(a for a, _, _ in rows_of_split)
        assert 20 <= len(rows_of_split) <= 60 and set(anchors.values()) == {2}  # a triplet's pairs stay together


def test_stratified_split_keeps_every_class(tmp_path: Path) -> None:
    indexes = write_shards("digits", "labeled", tmp_path / "split", test_fraction=0.25, seed=1)
    assert set(indexes) == {"train", "test"}
    train, test = (read_tars(tmp_path / "split" / name, indexes[name]) for name in ("train", "test"))
    assert indexes["test"].num_samples == 450 and indexes["train"].num_samples == 1347  # ceil(0.25 * 1797)
    assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
    for samples in (train, test):
        counts = Counter(int(s["cls"]) for s in samples.values())
        assert set(counts) == set(range(10))
    test_counts = Counter(int(s["cls"]) for s in test.values())
    for label, count in Counter(DIGITS.target.tolist()).items():
        assert abs(test_counts[label] - 0.25 * count) <= 1  # stratified: each class split at the fraction
    assert read_index(tmp_path / "split" / "test").split == "test"


def test_sampled_pairs_are_seeded_and_labeled_correctly(tmp_path: Path) -> None:
    first = write_shards("digits", "pairs", tmp_path / "p1", seed=7, pairs_per_item=2)["all"]
    write_shards("digits", "pairs", tmp_path / "p2", seed=7, pairs_per_item=2)
    write_shards("digits", "pairs", tmp_path / "p3", seed=8, pairs_per_item=2)
    shard = "shard-000000.tar"
    assert (tmp_path / "p1" / shard).read_bytes() == (tmp_path / "p2" / shard).read_bytes()
    assert (tmp_path / "p1" / shard).read_bytes() != (tmp_path / "p3" / shard).read_bytes()
    samples = read_tars(tmp_path / "p1", first)
    assert len(samples) == 2 * 1797
    flags = [s["similar"] for s in samples.values()]
    assert abs(flags.count(b"1") - flags.count(b"0")) <= 1
    by_pixels = {DIGITS.data[i].astype(np.float32).tobytes(): DIGITS.target[i] for i in range(1797)}
    for s in samples.values():
        assert (s["similar"] == b"1") == (s["a.cls"] == s["b.cls"])
        assert by_pixels[(decode_npy(s["b.npy"]) * 16).tobytes()] == int(s["b.cls"])  # cls is b's own class


def test_sampled_triplets_from_split_text(tmp_path: Path) -> None:
    source = tmp_path / "labeled.csv"
    source.write_text("text,label\n" + "".join(f"item {i},{i % 3}\n" for i in range(30)))
    indexes = write_shards(str(source), "triplets", tmp_path / "t", test_fraction=0.5, seed=2)
    for name in ("train", "test"):
        samples = read_tars(tmp_path / "t" / name, indexes[name])
        assert len(samples) == 15
        texts = {s["anchor.txt"] for s in samples.values()}
        for s in samples.values():
            assert s["anchor.cls"] == s["positive.cls"] != s["negative.cls"]
            assert s["positive.txt"] != s["anchor.txt"] and {s["positive.txt"], s["negative.txt"]} <= texts


@pytest.mark.parametrize(("content", "name", "kind", "message"), [
    (None, "missing.csv", "labeled", "not found"),
    ("text,lbl\nhello,1\n", "data.csv", "labeled", "missing columns"),
    ("text,label\nhello,1\nworld,one\n", "data.csv", "labeled", r"data.csv:3: column 'label' must be an integer"),
    ('{"text": "a", "label": 1}\n{"text": "b"}\n', "data.jsonl", "labeled", r"data.jsonl:2: missing column 'label'"),
    ('{"text": "a", "label": 1}\nnot json\n', "data.jsonl", "labeled", r"data.jsonl:2: not valid JSON"),
    ("a,b,similar\nx,y,maybe\n", "data.csv", "pairs", r"data.csv:2: column 'similar' must be 1 or 0"),
    ("a,b,similar\nx,y,1\n", "data.csv", "triplets", "cannot be written as triplets"),
    ("a,b,similar,a_label\nx,y,1,3\n", "data.csv", "pairs", "b_label"),
    ("text,label\n", "data.csv", "labeled", "no records"),
    ("text,label\nhello,1\n", "data.txt", "labeled", "unknown source type"),
    ("text,label\nhello,1\n", "data.csv", "quads", "--kind 'quads'"),
    ("text,label\nhello,1\nworld,1\n", "data.csv", "pairs", "at least 2 classes"),
])
def test_bad_sources_raise_data_error(tmp_path: Path, content: str | None, name: str, kind: str,
                                      message: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        write_shards(str(tmp_path / name), kind, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_image_folders_raise_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        write_shards(str(tmp_path / "empty"), "labeled", tmp_path / "out")
    root = make_image_folder(tmp_path / "sizes", {"a": 2})
    (root / "a" / "big.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="big.png: not a readable image"):
        write_shards(str(root), "labeled", tmp_path / "out")
    with pytest.raises(DataError, match="stratify|split"):  # one image per class cannot be stratified
        write_shards(str(make_image_folder(tmp_path / "ones", {"a": 1, "b": 1})), "labeled", tmp_path / "out",
                     test_fraction=0.5)


def test_read_index_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path}/index.json: shard index not found"):
        read_index(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(DataError, match="not a readable JSON"):
        read_index(tmp_path)
    write_shards("digits", "labeled", tmp_path / "ok", samples_per_shard=1000)
    raw = json.loads((tmp_path / "ok" / INDEX_FILE).read_text())
    for change, message in [({"version": 9}, "version 9"), ({"kind": "quads"}, "kind 'quads'"),
                            ({"num_samples": 5}, "num_samples 5"), ({"views": {"input": {"ext": "pkl"}}}, "'pkl'")]:
        (tmp_path / "ok" / INDEX_FILE).write_text(json.dumps({**raw, **change}))
        with pytest.raises(DataError, match=message):
            read_index(tmp_path / "ok")
    (tmp_path / "ok" / INDEX_FILE).write_text(json.dumps(raw))
    (tmp_path / "ok" / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="missing, e.g. shard-000001.tar"):
        read_index(tmp_path / "ok")


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    write_shards("digits", "labeled", tmp_path / "out", samples_per_shard=1000)
    before = (tmp_path / "out" / INDEX_FILE).read_bytes()
    with pytest.raises(DataError, match="already exists"):
        write_shards("digits", "pairs", tmp_path / "out")
    assert (tmp_path / "out" / INDEX_FILE).read_bytes() == before
    write_shards("digits", "pairs", tmp_path / "out", overwrite=True)
    assert read_index(tmp_path / "out").kind == "pairs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or retired directories left


def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = writer._write_shard
    calls = []

    def failing_write(path: Path, samples: list) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(path, samples)

    monkeypatch.setattr(writer, "_write_shard", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_shards("digits", "labeled", tmp_path / "out", test_fraction=0.4, samples_per_shard=400)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(writer, "_write_shard", real_write)
    write_shards("digits", "labeled", tmp_path / "out", samples_per_shard=1000)
    monkeypatch.setattr(writer, "_write_shard", failing_write)
    calls.clear()
    with pytest.raises(OSError):
        write_shards("digits", "pairs", tmp_path / "out", samples_per_shard=400, overwrite=True)
    assert read_index(tmp_path / "out").kind == "labeled"  # the old output survives a failed overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
