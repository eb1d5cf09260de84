"""`twinscale shards` at scale: tables streamed row by row with a hashed split, Parquet tables, shards written by a
pool of processes (byte-identical to one process), and shard sets written straight to S3 (a real S3-compatible
server on loopback: moto's server mode, tests/conftest.py), staged so that a half-written set is never readable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from launch import cli
from tests.test_remote import s3, s3_env  # noqa: F401 (the fixture `s3`: a fresh bucket on the loopback server)
from tests.test_shards import make_image_folder
from trainer.data import remote, writer
from trainer.data.formats import read_index
from trainer.data.shardsets import open_shard_set
from trainer.data.sources import Table, read_source
from trainer.data.writer import in_test_split, write_shards
from trainer.errors import DataError


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path (hidden staging directories would show up here too)."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def pairs_jsonl(path: Path, rows: int) -> Path:
    lines = (json.dumps({"a": f"query {i % (rows // 2)}", "b": f"doc {i}", "similar": i % 3 != 0,
                         "a_label": i % 7, "b_label": i % 5}) for i in range(rows))
    path.write_text("\n".join(lines) + "\n")
    return path


def image_table(root: Path, rows: int) -> list[dict[str, str]]:
    """Photos of two sizes and formats under root/photos and their captions, as table rows."""
    (root / "photos").mkdir(parents=True)
    table = []
    for i in range(rows):
        name = f"photos/p{i}.{'jpg' if i % 3 else 'png'}"
        Image.new("RGB", (4 + i % 2, 3), color=(i * 9 % 256, 0, 0)).save(root / name)
        table.append({"image": name, "caption": f"photo number {i}"})
    return table


def test_a_table_streams_and_its_split_is_a_seeded_hash_per_row(tmp_path: Path) -> None:
    source = pairs_jsonl(tmp_path / "pairs.jsonl", 400)
    table = read_source(str(source))
    assert isinstance(table, Table) and table.form == "pairs" and table.labeled
    records = table.records()
    assert next(records)[1][1].read() == b"doc 0"  # a generator: rows are parsed as they are asked for
    records.close()
    indexes = write_shards(str(source), "pairs", tmp_path / "out", test_fraction=0.25, seed=5, samples_per_shard=32)
    test_rows = {s for s in _keys(tmp_path / "out" / "test")}
    expected = {f"{i:08d}" for i in range(400) if in_test_split(5, f"query {i % 200}".encode(), 0.25)}
    assert test_rows == expected and 60 <= len(expected) <= 140
    assert indexes["train"].num_samples + indexes["test"].num_samples == 400
    assert indexes["train"].num_classes == 7 and indexes["train"].labels  # classes over both columns and splits
    # Rows sharing their first column (here each query twice) land in the same split.
    queries = {i % 200 for i in range(400) if f"{i:08d}" in test_rows}
    assert test_rows == {f"{i:08d}" for i in range(400) if i % 200 in queries}
    other_seed = write_shards(str(source), "pairs", tmp_path / "seed6", test_fraction=0.25, seed=6)
    assert _keys(tmp_path / "seed6" / "test") != test_rows and other_seed["test"].num_samples > 0


def _keys(directory: Path) -> set[str]:
    import tarfile

    keys = set()
    for shard in read_index(directory).shards:
        with tarfile.open(directory / shard.file) as tar:
            keys |= {member.name.partition(".")[0] for member in tar.getmembers()}
    return keys


def test_parquet_tables_write_the_same_shards_as_csv(tmp_path: Path) -> None:
    rows = image_table(tmp_path, 23)
    (tmp_path / "captions.csv").write_text("image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "captions.parquet", row_group_size=5)  # 5 row groups
    for name in ("captions.csv", "captions.parquet"):
        assert cli.main(["shards", str(tmp_path / name), "--kind", "pairs", "--out", str(tmp_path / name[9:]),
                         "--samples-per-shard", "8"]) == 0
    csv_files, parquet_files = files(tmp_path / "csv"), files(tmp_path / "parquet")
    assert sorted(csv_files) == sorted(parquet_files) == ["index.json", *(f"shard-00000{i}.tar" for i in range(3))]
    assert all(csv_files[name] == parquet_files[name] for name in csv_files if name.endswith(".tar"))
    index = read_index(tmp_path / "parquet")
    assert index.views["a"].ext == "jpg" and index.views["a"].alternatives == ("png",)
    assert index.views["a"].shape == (3,) and index.views["b"].ext == "txt"  # two sizes: any size, RGB
    labeled = pa.Table.from_pylist([{"text": f"t{i}", "label": i % 3} for i in range(30)])
    pq.write_table(labeled, tmp_path / "labeled.parquet", row_group_size=7)
    split = write_shards(str(tmp_path / "labeled.parquet"), "triplets", tmp_path / "lab", test_fraction=0.5)
    assert split["train"].num_samples == split["test"].num_samples == 15  # labeled: the stratified split


@pytest.mark.parametrize(("rows", "message"), [
    ([{"a": "x", "b": "y", "similar": 1}, {"a": "x", "b": None, "similar": 1}], r"t.parquet:2: column 'b' must be"),
    ([{"a": "x", "b": "y", "similar": 7}], r"t.parquet:1: column 'similar' must be 1 or 0"),
    ([{"a": "x", "c": "y"}], "missing columns: found a, c"),
])
def test_bad_parquet_tables_name_the_row_and_column(tmp_path: Path, rows: list, message: str) -> None:
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=message):
        write_shards(str(tmp_path / "t.parquet"), "pairs", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        write_shards(str(tmp_path / "junk.parquet"), "pairs", tmp_path / "out")


def test_workers_write_the_same_bytes_as_one_process(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "folder", {"a": 9, "b": 7, "c": 8})
    rows = image_table(tmp_path / "t", 30)
    (tmp_path / "t" / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    runs = [(str(folder), "pairs", ["--pairs-per-item", "2", "--test-fraction", "0.3"]),
            (str(tmp_path / "t" / "captions.jsonl"), "pairs", ["--test-fraction", "0.3"])]
    for number, (source, kind, extra) in enumerate(runs):
        outputs = []
        for workers in ("1", "2"):
            out = tmp_path / f"out{number}-{workers}"
            assert cli.main(["shards", source, "--kind", kind, "--out", str(out), "--samples-per-shard", "5",
                             "--seed", "4", "--workers", workers, *extra]) == 0
            outputs.append(files(out))
        assert outputs[0] == outputs[1] and len(outputs[0]) > 6


def test_a_bad_row_deep_in_a_table_leaves_nothing_with_workers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = pairs_jsonl(tmp_path / "pairs.jsonl", 300)
    with source.open("a") as handle:
        handle.write('{"a": "x", "b": "y", "similar": 1, "a_label": 1, "b_label": "two"}\n')
    assert cli.main(["shards", str(source), "--kind", "pairs", "--out", str(tmp_path / "out"), "--workers", "2",
                     "--samples-per-shard", "16"]) == 2
    assert "pairs.jsonl:301: column 'b_label' must be an integer" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]
    assert cli.main(["shards", str(source), "--kind", "pairs", "--out", str(tmp_path / "o"), "--workers", "0"]) == 2


def test_shards_go_straight_to_s3_index_last(s3: str, tmp_path: Path,  # noqa: F811 (the fixture)
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    source = pairs_jsonl(tmp_path / "pairs.jsonl", 100)
    args = ["shards", str(source), "--kind", "pairs", "--samples-per-shard", "16", "--test-fraction", "0.3"]
    assert cli.main([*args, "--out", str(tmp_path / "local")]) == 0
    written: list[str] = []
    write_bytes = remote.write_bytes
    monkeypatch.setattr(remote, "write_bytes", lambda url, data: (written.append(url), write_bytes(url, data)))
    assert cli.main([*args, "--out", f"{s3}/sets/pairs"]) == 0
    assert [url.rsplit("/", 1)[-1] for url in written[-2:]] == ["index.json", "index.json"]
    assert not any(url.endswith("index.json") for url in written[:-2])  # every shard before any index
    assert cli.main([*args, "--out", f"{s3}/sets/pairs2", "--workers", "2"]) == 0  # workers upload themselves
    fs, root = remote.filesystem(s3)
    local = files(tmp_path / "local")
    for prefix in ("pairs", "pairs2"):  # the same bytes as a local set
        assert {name: fs.cat_file(f"{root}/sets/{prefix}/{name}") for name in local} == local
    assert open_shard_set(f"{s3}/sets/pairs/train") == read_index(tmp_path / "local" / "train")
    # A non-empty prefix is refused; --overwrite replaces it, stale objects included.
    fs.pipe_file(f"{root}/sets/pairs/shard-000099.tar", b"stale")
    assert cli.main([*args, "--out", f"{s3}/sets/pairs"]) == 2
    assert cli.main([*args, "--out", f"{s3}/sets/pairs", "--test-fraction", "0.5", "--overwrite"]) == 0
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/sets/pairs/shard-000099.tar")
    assert fs.cat_file(f"{root}/sets/pairs/test/index.json") != local["test/index.json"]


def test_a_failed_upload_leaves_no_objects(s3: str, tmp_path: Path,  # noqa: F811 (the fixture)
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    source = pairs_jsonl(tmp_path / "pairs.jsonl", 100)
    real_put = writer._put_shard
    calls: list[str] = []

    def failing_put(url: str, samples: object) -> None:
        calls.append(url)
        if len(calls) == 4:
            raise DataError(f"{url}: unreachable, failed 4 times")
        real_put(url, samples)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "_put_shard", failing_put)
    assert cli.main(["shards", str(source), "--kind", "pairs", "--samples-per-shard", "16",
                     "--out", f"{s3}/failed"]) == 2
    fs, root = remote.filesystem(s3)
    fs.invalidate_cache()
    assert len(calls) == 4 and fs.find(root) == []
    assert cli.main(["shards", str(source), "--kind", "pairs", "--out", f"{s3}/after"]) == 0
    assert cli.main(["shards", str(source), "--kind", "pairs", "--out", "s3://no-such-bucket-here/x"]) == 2


def test_labeled_sources_keep_sampling_in_memory_and_vectors_unchanged(tmp_path: Path) -> None:
    """The digits (a labeled source) are written as before, by one process or several."""
    one = write_shards("digits", "pairs", tmp_path / "one", seed=3, samples_per_shard=400)
    two = write_shards("digits", "pairs", tmp_path / "two", seed=3, samples_per_shard=400, workers=2)
    assert one == two and files(tmp_path / "one") == files(tmp_path / "two")
    assert np.sum([s.samples for s in one["all"].shards]) == 1797


def _peak_rss_mib(table: Path, out: Path) -> float:
    """Peak resident memory of `twinscale shards TABLE` in a fresh process (its own ru_maxrss)."""
    import os
    import subprocess
    import sys

    code = "import sys; from launch.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, "shards", str(table), "--kind", "pairs", "--out",
                                str(out), "--test-fraction", "0.1", "--samples-per-shard", "500"],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss / 1024


@pytest.mark.slow
def test_memory_does_not_grow_with_the_table(tmp_path: Path) -> None:
    """100× more rows, the same peak memory (± noise): rows stream, nothing is held per row (bench/shards.py
    measures the writer that held every record against this one)."""
    small, large = pairs_jsonl(tmp_path / "small.jsonl", 2_000), pairs_jsonl(tmp_path / "large.jsonl", 200_000)
    growth = _peak_rss_mib(large, tmp_path / "large") - _peak_rss_mib(small, tmp_path / "small")
    assert growth < 30, f"peak memory grew by {growth:.0f} MiB from 2,000 to 200,000 rows"
