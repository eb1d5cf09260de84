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


def test_data_source_writes_the_configured_kind_and_shard_size(tmp_path: Path) -> None:
    """`data.source` honours data.source_kind, samples_per_shard and pairs_per_item, as `twinscale shards` does."""
    from trainer import config
    from trainer.data.formats import read_index

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b,similar\n" + "".join(f"text {i},text {i} again,{i % 2}\n" for i in range(40)))
    out, recipe = tmp_path / "pairs", tmp_path / "recipe.yaml"
    recipe.write_text("seed: 0\n")
    cfg = config.load(recipe, [f"data.source={pairs}", "data.source_kind=pairs", "data.samples_per_shard=5",
                             f"data.train={out / 'train'}", f"data.test={out / 'test'}", "data.test_fraction=0.25"])
    cli.ensure_shards(cfg)
    train, test = read_index(out / "train"), read_index(out / "test")
    assert (train.kind, test.kind) == ("pairs", "pairs")
    assert train.num_samples + test.num_samples == 40
    assert max(shard.samples for shard in train.shards) == 5 and len(train.shards) == -(-train.num_samples // 5)

    digits = tmp_path / "digit-triplets"
    cfg = config.load(recipe, ["data.source=digits", "data.source_kind=triplets", "data.pairs_per_item=2",
                             "data.samples_per_shard=1000", f"data.train={digits / 'train'}",
                             f"data.test={digits / 'test'}"])
    cli.ensure_shards(cfg)
    train, test = read_index(digits / "train"), read_index(digits / "test")
    assert train.kind == "triplets" and len(train.shards) == -(-train.num_samples // 1000)
    assert train.num_samples + test.num_samples == 2 * 1797  # two triplets per labeled item


@pytest.mark.slow
def test_cuda_on_a_cluster_without_gpus_exits_2_naming_the_key(tmp_path: Path, shards: Path, capsys) -> None:
    """A local CPU Ray: `dist.device: cuda` would wait for GPUs forever; it exits 2 before the trainer starts."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the local Ray has GPUs")
    assert run_train(tmp_path, shards, "dist.device=cuda", "dist.workers=1") == 2
    err = capsys.readouterr().err
    assert "error: dist.device: cuda needs one GPU per worker (1 workers), but the cluster has 0 GPU(s)" in err, err
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()


def test_resume_keeps_a_run_name_that_yaml_reads_as_a_number(tmp_path: Path, capsys) -> None:
    """A Ray Tune trial's run directory is named like `38404_00001`, which YAML reads as the int 3840400001: resume
    must still take it as the run's name (it then fails only for want of a checkpoint here)."""
    run_dir = tmp_path / "runs" / "38404_00001"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("log: {wandb: false}\n")
    assert cli.main(["resume", str(run_dir)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
