"""The exported inference model: `model.safetensors` (weights) + `config.json` (how to rebuild the towers).

Loading needs neither DeepSpeed nor pickle: `config.json` rebuilds the model with `build_model`, and the
weights are read with safetensors, which only ever parses tensors. Writes go to temporary files that are moved
into place with `os.replace`; `config.json` is replaced last and records the SHA-256 of the weights, so an
export interrupted between the two moves is detected on load instead of pairing old config with new weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.config import ModelConfig
from trainer.errors import CheckpointError, ConfigError
from trainer.models.towers import EmbeddingModel, InputSpec, build_model

FORMAT_NAME = "twinscale-embedding-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def export_model(model: EmbeddingModel | dict[str, torch.Tensor], cfg: ModelConfig, spec_a: InputSpec,
                 spec_b: InputSpec | None, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """Write `out_dir/model.safetensors` and `out_dir/config.json`; `extra` (e.g. text hashing) is kept as is.

    `model` is a model or its state dict (a training run passes the optimizer's fp32 master weights)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, config = out_dir / WEIGHTS_FILE, out_dir / CONFIG_FILE
    weights_tmp, config_tmp = _temp_path(weights), _temp_path(config)
    try:
        state = model if isinstance(model, dict) else model.state_dict()
        save_file(_plain_state_dict(state), str(weights_tmp), metadata={"format": FORMAT_NAME})
        _fsync(weights_tmp)
        document = _config_document(cfg, spec_a, spec_b, extra, _sha256(weights_tmp))
        config_tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        _fsync(config_tmp)
        os.replace(weights_tmp, weights)
        os.replace(config_tmp, config)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)


def _config_document(cfg: ModelConfig, spec_a: InputSpec, spec_b: InputSpec | None,
                     extra: dict[str, Any] | None, weights_sha256: str) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": cfg.model_dump(mode="json"),
        "inputs": {"a": spec_a.to_dict(), "b": spec_b.to_dict() if spec_b is not None else None},
        "extra": extra or {},
        "weights_sha256": weights_sha256,
    }


def load_exported(path: Path) -> tuple[EmbeddingModel, dict[str, Any]]:
    """Rebuild the model exported in directory `path` (in eval mode) and return it with its config.json."""
    directory = Path(path)
    directory = directory.parent if directory.is_file() else directory
    document = _read_config(directory / CONFIG_FILE)
    model = _rebuild(document, directory / CONFIG_FILE)
    _load_weights(model, directory / WEIGHTS_FILE, document.get("weights_sha256"))
    return model.eval(), document


def _plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views); a contiguous CPU copy of each
    # entry de-aliases them, and loading copies the same values back into every alias.
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}


def _read_config(config_path: Path) -> dict[str, Any]:
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found; expected an exported model directory holding "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        document = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: not a readable JSON model config ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path}: not a {FORMAT_NAME} config (format "
                              f"{document.get('format') if isinstance(document, dict) else None!r})")
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {document.get('format_version')!r} is not "
                              f"supported (this version reads {FORMAT_VERSION}); export the model again")
    return document


def _rebuild(document: dict[str, Any], config_path: Path) -> EmbeddingModel:
    try:
        cfg = ModelConfig.model_validate(document["model"])
        inputs = document["inputs"]
        spec_a = InputSpec.from_dict(inputs["a"])
        spec_b = InputSpec.from_dict(inputs["b"]) if inputs.get("b") is not None else None
        return build_model(cfg, spec_a, spec_b)
    except (KeyError, TypeError, ValueError, ValidationError, ConfigError) as error:
        raise CheckpointError(f"{config_path}: model or input description is invalid ({error})") from None


def _load_weights(model: EmbeddingModel, weights_path: Path, expected_sha256: str | None) -> None:
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: not found; the export is incomplete, export the model again")
    if expected_sha256 is not None and _sha256(weights_path) != expected_sha256:
        raise CheckpointError(f"{weights_path}: does not match the checksum in {CONFIG_FILE} (corrupt file or "
                              "an interrupted export); export the model again")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({error})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{weights_path}: tensors do not match the model in {CONFIG_FILE} ({error})") from None


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _fsync(path: Path) -> None:
    # Flush to disk before os.replace, so a power loss cannot leave the final name pointing at empty data.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
