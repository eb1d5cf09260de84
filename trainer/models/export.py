"""The exported inference model: `model.safetensors` (weights) + `config.json` (how to rebuild the towers).

Loading needs neither DeepSpeed nor pickle: `config.json` rebuilds the model with `build_model`, and the
weights are read with safetensors, which only ever parses tensors. Writes go to temporary files that are moved
into place with `os.replace`; `config.json` is replaced last and records the SHA-256 of every other file, so an
export interrupted between the moves is detected on load instead of pairing old config with new weights.

A pretrained Hugging Face text tower is saved as a transformers model (`save_pretrained`: config, safetensors,
tokenizer) in `0_Transformer/` (tower A) or `tower_b_transformer/` (tower B of a pseudo-Siamese model), with its
LoRA adapters merged; a vision tower likewise, with its image processor's config, in `tower_a_vision/` or
`tower_b_vision/` (`AutoModel.from_pretrained` loads either); `model.safetensors` holds the rest (projection
heads). An export never needs the pretrained directory it was fine-tuned from. When tower A is one, the
directory is also a sentence-transformers model (modules.json: Transformer, Pooling, Dense for the pooler and the
head, Normalize; prompts in config_sentence_transformers.json): `SentenceTransformer(run/model)` embeds as
`twinscale embed` does. `config.json` also describes each side's preprocessing (`Preprocessor.to_dict`), so
inference preprocesses exactly as training did.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.config import ModelConfig
from trainer.data.preprocess import Preprocessor, preprocessor_from_dict
from trainer.errors import CheckpointError, ConfigError
from trainer.models.towers import EmbeddingModel, InputSpec, build_model

FORMAT_NAME = "twinscale-embedding-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Where each side's pretrained Hugging Face tower is saved (tower A's text tower is sentence-transformers' module 0).
HF_TOWER_DIRS = {"a": "0_Transformer", "b": "tower_b_transformer"}
HF_VISION_DIRS = {"a": "tower_a_vision", "b": "tower_b_vision"}


def export_model(model: EmbeddingModel | dict[str, torch.Tensor], cfg: ModelConfig, spec_a: InputSpec,
                 spec_b: InputSpec | None, out_dir: Path, extra: dict[str, Any] | None = None,
                 preprocessors: dict[str, Preprocessor] | None = None) -> None:
    """Write the model to `out_dir` (see the module docstring); `extra` (e.g. text hashing) is kept as is.

    `model` is a model or its state dict (a training run passes the optimizer's fp32 master weights);
    `preprocessors` (per view, as the run streamed them) are recorded per side for inference."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        state = dict(model) if isinstance(model, dict) else model.state_dict()
        hf_sides = _hf_sides(cfg, spec_a, spec_b)
        if hf_sides:
            from trainer.models.st_export import save_hf_towers

            state = save_hf_towers(state, cfg, spec_a, spec_b, hf_sides, staging)
        save_file(_plain_state_dict(state), str(staging / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        files = sorted(str(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file())
        empty_folders = [str(path.relative_to(staging)) for path in staging.rglob("*")
                         if path.is_dir() and not any(path.iterdir())]
        hashes = {name: _sha256(staging / name) for name in files}
        exported_cfg = _exported_config(cfg, hf_sides)
        sides = _side_preprocessing(preprocessors, hf_sides)
        document = _config_document(exported_cfg, spec_a, spec_b, extra, hashes.pop(WEIGHTS_FILE), hf_sides, sides,
                                    hashes)
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        for name in [*files, CONFIG_FILE]:  # config.json last: it names the files that belong to it
            _fsync(staging / name)
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out_dir / name)
        for folder in empty_folders:  # modules without files (sentence-transformers' Normalize)
            (out_dir / folder).mkdir(parents=True, exist_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _hf_sides(cfg: ModelConfig, spec_a: InputSpec, spec_b: InputSpec | None) -> dict[str, str]:
    """Sides whose tower is a pretrained hf tower (text or vision) → the directory its backbone is saved in."""
    kinds = {"a": cfg.encoder}
    if cfg.architecture == "pseudo_siamese":
        kinds["b"] = cfg.encoder_b or cfg.encoder
    specs = {"a": spec_a, "b": spec_b or spec_a}
    return {side: (HF_TOWER_DIRS if specs[side].modality == "text" else HF_VISION_DIRS)[side]
            for side, kind in kinds.items() if kind == "hf"}


def _exported_config(cfg: ModelConfig, hf_sides: dict[str, str]) -> ModelConfig:
    """The model config that rebuilds the export: hf towers from their saved directories (relative to the export),
    adapters merged, nothing frozen or checkpointed."""
    if not hf_sides:
        return cfg
    update: dict[str, Any] = {"lora": None, "gradient_checkpointing": False, "freeze": ()}
    if "a" in hf_sides:
        update["pretrained"] = hf_sides["a"]
    if "b" in hf_sides:
        update["pretrained_b"] = hf_sides["b"]
    return cfg.model_copy(update=update)


def _side_preprocessing(preprocessors: dict[str, Preprocessor] | None,
                        hf_sides: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per side ("a", "b"): the preprocessing of the first view it read; tokenizers point at the saved copy."""
    from trainer.data.tokenize import TokenizerPreprocessor
    from trainer.models.hf import VIEW_SIDE

    sides: dict[str, dict[str, Any]] = {}
    for view, preprocessor in (preprocessors or {}).items():
        side = VIEW_SIDE[view]
        if side in sides:
            continue
        if isinstance(preprocessor, TokenizerPreprocessor) and side in hf_sides:
            preprocessor = preprocessor.with_source(hf_sides[side])
        elif isinstance(preprocessor, TokenizerPreprocessor) and "a" in hf_sides:  # siamese: one tower, one copy
            preprocessor = preprocessor.with_source(hf_sides["a"])
        sides[side] = preprocessor.to_dict()
    return sides


def _config_document(cfg: ModelConfig, spec_a: InputSpec, spec_b: InputSpec | None,
                     extra: dict[str, Any] | None, weights_sha256: str, hf_sides: dict[str, str] | None = None,
                     preprocessing: dict[str, dict[str, Any]] | None = None,
                     files: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": cfg.model_dump(mode="json"),
        "inputs": {"a": spec_a.to_dict(), "b": spec_b.to_dict() if spec_b is not None else None},
        "extra": extra or {},
        "hf_towers": hf_sides or {},
        "preprocessing": preprocessing or {},
        "files_sha256": files or {},
        "weights_sha256": weights_sha256,
    }


def load_exported(path: Path) -> tuple[EmbeddingModel, dict[str, Any]]:
    """Rebuild the model exported in directory `path` (in eval mode) and return it with its config.json.

    The model's `preprocessing` attribute holds, per side, its exported `Preprocessor` (`exported_preprocessors`)."""
    directory = Path(path)
    directory = directory.parent if directory.is_file() else directory
    document = _read_config(directory / CONFIG_FILE)
    for name, digest in (document.get("files_sha256") or {}).items():
        _check_file(directory / name, digest)
    model = _rebuild(document, directory)
    _load_weights(model, directory / WEIGHTS_FILE, document.get("weights_sha256"),
                  tuple(f"tower_{side}.encoder." for side in document.get("hf_towers") or {}))
    model.preprocessing = exported_preprocessors(document, directory)  # type: ignore[assignment]
    return model.eval(), document


def exported_preprocessors(document: dict[str, Any], directory: Path) -> dict[str, Preprocessor]:
    """Per side, the preprocessing an exported model was trained with (tokenizer sources inside `directory`)."""
    sides: dict[str, Preprocessor] = {}
    for side, raw in (document.get("preprocessing") or {}).items():
        raw = dict(raw)
        source = raw.get("source")
        if isinstance(source, str) and not Path(source).is_absolute() and (directory / source).is_dir():
            raw["source"] = str(directory / source)
        try:
            sides[side] = preprocessor_from_dict(raw)
        except ValueError as error:
            raise CheckpointError(f"{directory / CONFIG_FILE}: preprocessing of side {side}: {error}") from None
    return sides


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


def _rebuild(document: dict[str, Any], directory: Path) -> EmbeddingModel:
    config_path = directory / CONFIG_FILE
    try:
        cfg = ModelConfig.model_validate(document["model"])
        local = {"a": "pretrained", "b": "pretrained_b"}
        hf_sides = document.get("hf_towers") or {}
        cfg = cfg.model_copy(update={local[side]: str(directory / name) for side, name in hf_sides.items()})
        inputs = document["inputs"]
        spec_a = InputSpec.from_dict(inputs["a"])
        spec_b = InputSpec.from_dict(inputs["b"]) if inputs.get("b") is not None else None
        from trainer.models.module import without_pretrained_weights

        with without_pretrained_weights():  # module towers: every weight comes from the export, not `pretrained`
            return build_model(cfg, spec_a, spec_b)
    except (KeyError, TypeError, ValueError, ValidationError, ConfigError) as error:
        raise CheckpointError(f"{config_path}: model or input description is invalid ({error})") from None


def _check_file(path: Path, expected_sha256: str | None) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; the export is incomplete, export the model again")
    if expected_sha256 is not None and _sha256(path) != expected_sha256:
        raise CheckpointError(f"{path}: does not match the checksum in {CONFIG_FILE} (corrupt file or "
                              "an interrupted export); export the model again")


def _load_weights(model: EmbeddingModel, weights_path: Path, expected_sha256: str | None,
                  saved_apart: tuple[str, ...] = ()) -> None:
    """Load `weights_path` into `model`; parameters under `saved_apart` prefixes (hf backbones, loaded from their
    own directories) are expected to be absent from it."""
    _check_file(weights_path, expected_sha256)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({error})") from None
    try:
        if not saved_apart:
            model.load_state_dict(state, strict=True)
            return
        result = model.load_state_dict(state, strict=False)
        missing = [name for name in result.missing_keys if not name.startswith(saved_apart)]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"missing tensors {missing[:5]}, unexpected tensors {result.unexpected_keys[:5]}")
    except RuntimeError as error:
        raise CheckpointError(f"{weights_path}: tensors do not match the model in {CONFIG_FILE} ({error})") from None


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
