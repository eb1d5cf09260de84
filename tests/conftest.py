"""Fixtures shared by tests that run the worker entry point on the real digits."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.cli import main as twinscale

DIGITS_RECIPE = """\
data: {{train: {root}/digits/train, test: {root}/digits/test, batch_size: 64}}
model: {{encoder: mlp, hidden_dims: [64], embedding_dim: 16}}
loss: {{name: supcon}}
mining: {{name: none}}
log: {{wandb: false}}
"""


@pytest.fixture(scope="session")
def digits_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits as vector shards (40 % held out) and a small MLP + SupCon recipe for them; tests
    add their own keys with --set."""
    root = tmp_path_factory.mktemp("digits-recipe")
    assert twinscale(["shards", "digits", "--kind", "labeled", "--out", str(root / "digits"), "--test-fraction",
                      "0.4", "--samples-per-shard", "128"]) == 0
    path = root / "recipe.yaml"
    path.write_text(DIGITS_RECIPE.format(root=root))
    return path
