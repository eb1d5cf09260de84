"""Shared by the fault tests: the digits shards, the recipe, and one uninterrupted reference run (torchrun)."""

from __future__ import annotations

from pathlib import Path

import pytest
from faultrun import TOTAL_STEPS, finish, losses, torchrun, write_digits


@pytest.fixture(scope="session")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="session")
def reference(recipe: Path) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    code, output = finish(torchrun(recipe, "reference", cwd=recipe.parent))
    assert code == 0, output[-4000:]
    run_dir = recipe.parent / "runs" / "reference"
    assert [step for step, _ in losses(run_dir)] == list(range(1, TOTAL_STEPS + 1))
    return run_dir
