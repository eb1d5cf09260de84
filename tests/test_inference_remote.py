"""`twinscale eval`, `embed` and `mine` on the shard sets data.train takes, served by the loopback S3 server: a
Twinscale shard directory by its URL gives the same metrics, embeddings and mined triplets as its local copy;
an img2dataset-style set (tests/foreign_shards.py: plain tar files, no Twinscale index) by a brace pattern of
URLs with a field map (`--set data.fields=…`) gives the same as the same files on local disk; the model itself
may be a run's URL. Bad --set keys exit 2."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.cli import main as twinscale
from tests.foreign_shards import CLASSES, write_img2dataset_shards
from tests.test_remote import s3  # noqa: F401 (fixture)
from trainer.config import ModelConfig
from trainer.data import remote
from trainer.data.scan import scan
from trainer.data.writer import write_shards
from trainer.models.export import export_model
from trainer.models.towers import InputSpec, build_model

FIELDS = "data.fields={input: txt, label: json.label}"


def export(directory: Path, spec: InputSpec, cfg: ModelConfig) -> Path:
    torch.manual_seed(0)
    export_model(build_model(cfg, spec).eval(), cfg, spec, None, directory / "model")
    return directory


def upload(local: Path, url: str) -> None:
    fs, root = remote.filesystem(url)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")


def members(shard_dir: Path) -> list[tuple[str, bytes]]:
    """(member name, bytes) of every tar file of a shard directory, in file order."""
    found = []
    for path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            found += [(info.name, tar.extractfile(info).read()) for info in tar if info.isfile()]  # type: ignore[union-attr]
    return found


def eval_metrics(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert twinscale(["eval", *args]) == 0
    return capsys.readouterr().out


def test_twinscale_set_by_url_equals_local(s3: str, tmp_path: Path,  # noqa: F811
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = export(tmp_path / "run", InputSpec("vector", (64,)), ModelConfig(encoder="mlp", hidden_dims=(32,),
                                                                           embedding_dim=16))
    write_shards("digits", "labeled", tmp_path / "digits", samples_per_shard=256)
    upload(tmp_path / "digits", f"{s3}/digits")
    local = eval_metrics(capsys, str(run), "--data", str(tmp_path / "digits"))
    assert "map_at_r" in local and eval_metrics(capsys, str(run), "--data", f"{s3}/digits") == local

    assert twinscale(["embed", str(run), str(tmp_path / "digits"), "--out", str(tmp_path / "local.npz")]) == 0
    assert twinscale(["embed", str(run), f"{s3}/digits", "--out", str(tmp_path / "remote.npz")]) == 0
    here, there = np.load(tmp_path / "local.npz"), np.load(tmp_path / "remote.npz")
    assert len(here["keys"]) == 1797 and all(np.array_equal(here[k], there[k]) for k in ("embeddings", "labels",
                                                                                         "keys"))
    mine = ["--skip-top", "2", "--window", "10", "--samples-per-shard", "300"]
    assert twinscale(["mine", str(run), str(tmp_path / "digits"), "--out", str(tmp_path / "hard-local"), *mine]) == 0
    assert twinscale(["mine", str(run), f"{s3}/digits", "--out", str(tmp_path / "hard-remote"), *mine]) == 0
    assert members(tmp_path / "hard-remote") == members(tmp_path / "hard-local") != []  # bytes copied by range

    upload(run, f"{s3}/runs/exported")  # a run on object storage: the model comes from there
    (tmp_path / "run" / "config.yaml").write_text("{}\n")
    upload(tmp_path / "run", f"{s3}/runs/exported")
    assert eval_metrics(capsys, f"{s3}/runs/exported", "--data", f"{s3}/digits") == local


def test_foreign_set_by_pattern_with_a_field_map(s3: str, tmp_path: Path,  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = export(tmp_path / "run", InputSpec("text", (), text_buckets=4096),
                 ModelConfig(encoder="text", text_dim=32, embedding_dim=16))
    (tmp_path / "run" / "config.yaml").write_text("data: {text_buckets: 4096}\n")
    local = tmp_path / "foreign"
    write_img2dataset_shards(local, shards=3, per_shard=30)
    upload(local, f"{s3}/foreign")
    scan(f"{s3}/foreign/{{00000..00002}}.tar", f"{s3}/foreign/counts.json")  # no index.json: counts named below
    scan(f"{local}/{{00000..00002}}.tar", str(local / "counts.json"))
    remote_spec, local_spec = f"{s3}/foreign/{{00000..00002}}.tar", f"{local}/{{00000..00002}}.tar"

    expected = eval_metrics(capsys, str(run), "--data", local_spec, "--set", FIELDS,
                            "--set", f"data.test_index={local}/counts.json")
    assert "map_at_r" in expected
    assert eval_metrics(capsys, str(run), "--data", remote_spec, "--set", FIELDS,
                        "--set", f"data.test_index={s3}/foreign/counts.json") == expected

    out = tmp_path / "foreign.npz"
    assert twinscale(["embed", str(run), remote_spec, "--out", str(out), "--set", FIELDS,
                      "--set", f"data.test_index={s3}/foreign/counts.json"]) == 0
    embedded = np.load(out)
    assert embedded["embeddings"].shape == (90, 16)
    assert embedded["labels"].tolist() == [n % CLASSES for n in range(90)]  # json.label, in shard order
    assert embedded["keys"][0] == "000000000/input"

    hard = tmp_path / "hard"
    assert twinscale(["mine", str(run), remote_spec, "--out", str(hard), "--skip-top", "1", "--window", "10",
                      "--set", FIELDS, "--set", f"data.test_index={s3}/foreign/counts.json"]) == 0
    names = {name.rsplit(".", 1)[1] for name, _ in members(hard)}
    assert {"txt"} <= names and not names & {"jpg", "png", "pth", "json"}  # the mapped member only, copied
    captions = {data for name, data in members(hard) if name.endswith(".txt")}
    originals = {data for name, data in members(local) if name.endswith(".txt")}
    assert captions <= originals and json.loads((hard / "index.json").read_text())["kind"] == "triplets"


def test_data_settings_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = export(tmp_path / "run", InputSpec("vector", (64,)), ModelConfig(encoder="mlp", hidden_dims=(8,),
                                                                           embedding_dim=4))
    assert twinscale(["eval", str(run), "--data", str(tmp_path), "--set", "loss.margin=0.3"]) == 2
    assert "only data.* keys apply here" in capsys.readouterr().err
