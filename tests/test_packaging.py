"""A plain `pip install .` (no -e) must carry what `twinscale train` needs: every module of trainer/ and launch/,
the `twinscale` entry point, and the recipes of configs/ as package data, found by `config.load()` with no path.

The wheel is built from a copy of the sources (pip builds in-tree, and other work may share this checkout) and
unpacked into a directory that a fresh interpreter imports from, as site-packages would be.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("trainer", "launch", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(source), "-w", str(out)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("twinscale-*.whl")
    return path


def test_wheel_holds_every_module_the_recipes_and_the_entry_point(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for package in ("trainer", "launch")
               for path in (ROOT / package).rglob("*.py") if "__pycache__" not in path.parts}
    assert modules - names == set()  # a package directory missing from pyproject's list fails here
    recipes = {path.relative_to(ROOT / "configs").as_posix() for path in (ROOT / "configs").rglob("*.yaml")}
    assert "default.yaml" in recipes
    for recipe in recipes:
        assert f"trainer/configs/{recipe}" in names
        assert zipfile.ZipFile(wheel).read(f"trainer/configs/{recipe}") == (ROOT / "configs" / recipe).read_bytes()
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "twinscale = launch.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


LOAD_DEFAULT = """
import sys
from pathlib import Path
import trainer
from launch import cli
from trainer import config
assert Path(trainer.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), trainer.__file__
args = cli.build_parser().parse_args(["train"])  # `twinscale train` with no recipe
cfg = config.load(args.config, ["name=x"])
print(config.DEFAULT_RECIPE)
print(cfg.model.encoder, cfg.loss.name)
"""


def test_config_load_without_a_path_works_from_the_installed_layout(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"  # no configs/ in the working directory or beside the package
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", LOAD_DEFAULT, str(site)], cwd=elsewhere, text=True,
                            capture_output=True, timeout=120, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    recipe, described = result.stdout.split("\n")[:2]
    assert Path(recipe) == (site / "trainer" / "configs" / "default.yaml").resolve()
    assert described == "cnn supcon"  # the digits demo's recipe, not the bare defaults
