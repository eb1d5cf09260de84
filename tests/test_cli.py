"""Bad input through the command line: exit code 2, one message naming what is wrong, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    assert cli.main(["shards", "digits", "--kind", "labeled", "--out", str(root / "digits"),
                     "--test-fraction", "0.4"]) == 0
    return root / "digits"


def run_train(tmp_path: Path, shards: Path, *overrides: str) -> int:
    base = [f"data.train={shards / 'train'}", f"data.test={shards / 'test'}", "data.source=null",
            f"output_dir={tmp_path / 'runs'}", "name=bad", "model.encoder=mlp"]
    args = ["train"]
    for override in base + list(overrides):
        args += ["--set", override]
    return cli.main(args)


@pytest.mark.parametrize("overrides,message", [
    (["loss.margni=1"], "loss.margni: unknown key (did you mean margin?)"),
    (["optim.lr=fast"], "optim.lr: Input should be a valid number"),
    (["model.encoder=cnn"], "model.encoder: cnn needs image inputs"),
    (["model.architecture=pseudo_siamese"], "pseudo_siamese needs pair or triplet shards"),
    (["data.batch_size=4096"], "data.batch_size"),
])
def test_bad_runs_exit_2_before_anything_starts(overrides, message, tmp_path, shards, capsys) -> None:
    assert run_train(tmp_path, shards, *overrides) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "runs").exists()


def test_missing_shards_and_bad_paths(tmp_path: Path, shards: Path, capsys) -> None:
    assert run_train(tmp_path, shards, f"data.train={tmp_path / 'nowhere'}") == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(["resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli.main(["embed", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "x.npz")]) == 2
    assert not (tmp_path / "x.npz").exists()


def test_shards_refuses_to_overwrite(shards: Path, capsys) -> None:
    before = sorted(p.name for p in (shards / "train").iterdir())
    assert cli.main(["shards", "digits", "--kind", "labeled", "--out", str(shards), "--test-fraction", "0.4"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in (shards / "train").iterdir()) == before


def test_flags_are_checked_by_argparse(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["shards", "digits", "--kind", "quads", "--out", "x"])
    assert exit_info.value.code == 2
