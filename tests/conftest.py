"""Fixtures shared by tests that run the worker entry point on the real digits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from launch.cli import main as twinscale

DIGITS_RECIPE = """\
data: {{train: {root}/digits/train, test: {root}/digits/test, batch_size: 64}}
model: {{encoder: mlp, hidden_dims: [64], embedding_dim: 16}}
loss: {{name: supcon}}
mining: {{name: none}}
log: {{wandb: false}}
report: {{enabled: false}}
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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server on loopback for the session (moto's server mode): its endpoint URL. Tests
    point AWS_ENDPOINT_URL_S3 at it (tests/test_remote.py's `s3` fixture); nothing leaves the machine."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
