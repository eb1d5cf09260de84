"""`twinscale export RUN --format onnx [--quantize int8]`: an exported model as ONNX files for serving.

    twinscale export runs/digits                      # → runs/digits/onnx/
    twinscale export runs/clip/model --quantize int8 --out /srv/clip-onnx

Writes, per tower, `tower_a.onnx` (and `tower_b.onnx` for a pseudo-Siamese model), with `--quantize int8` also
`tower_X.int8.onnx` (onnxruntime's dynamic quantization: int8 weights of MatMul/Gemm, activations quantized at run
time), the tokenizer of each hf text side (`tokenizer_a/`, `tokenizer_b/`, loadable with `AutoTokenizer`) and
`onnx_config.json`: per tower its files, named inputs (dtype, shape with the dynamic axes named), output and
dimension; per side which tower embeds it and its preprocessing (the export's own description from config.json,
plus the rule in words) so a serving system reproduces it without Twinscale. The graph inputs of each tower kind
are described in trainer/models/onnx_towers.py. Each graph includes the projection head and the L2
normalisation: its output equals `model(batch, side)`; the export checks that with onnxruntime on its trace inputs.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript), the default and maintained exporter of
torch ≥ 2.9; the TorchScript one (`dynamo=False`) is deprecated there. It exported every tower kind here (mlp,
cnn, n-gram bag, BERT/MiniLM, ViT, EfficientNet-lite0) with named dynamic batch and sequence axes. A user module
that torch.export cannot trace falls back to the TorchScript exporter (recorded as `exporter` in the config).

Everything is written in a staging directory next to OUT and moved into OUT with `os.replace`, onnx_config.json
last (an earlier one is removed first), so OUT never holds a config describing half-written files. Nothing is
unpickled: the model is rebuilt from config.json and safetensors (`trainer.embed.load_model`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import CheckpointError, UserError

CONFIG_NAME = "onnx_config.json"
FORMAT_NAME = "twinscale-onnx"
FORMAT_VERSION = 1
OPSETS = range(17, 24)
# Preprocessing rules in words, per Preprocessor.to_dict()["name"], for serving systems without Twinscale.
RULES = {
    "array": "a float32 array of `shape` per item, stacked on a new first (batch) axis",
    "pixels": "decode PNG/JPEG to `shape[0]` channels (1: L, 3: RGB) of exactly shape[1]×shape[2] pixels, "
              "channels first, divided by 255",
    "image": "decode (EXIF orientation applied, transparency over white) to L (channels 1) or RGB; resize "
             "(bilinear) so the shorter side is `resize`, take the centre size×size crop; channels first, divide "
             "by 255, subtract `mean` and divide by `std` per channel (evaluation transform; no augmentation)",
    "hashed_text": "t = ' ' + text.lower().strip() + ' '; character n-grams t[i:i+n] for n in ngrams[0]..ngrams[1] "
                   "(i from 0 to max(1, len(t)-n+1)-1); id = zlib.crc32(utf-8 bytes) % buckets; right-pad each "
                   "batch to its longest row: ngram_ids 0 and ngram_mask 0 on padding, 1 on real n-grams",
    "tokenizer": "prompt + text; AutoTokenizer.from_pretrained(<tokenizer dir>) with truncation to max_length and "
                 "right padding to the batch's longest text → input_ids, attention_mask",
}


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote: the directory, the relative names of its files, and onnx_config.json's content."""

    out: Path
    files: tuple[str, ...]
    config: dict[str, Any]


def cmd_export(args: argparse.Namespace) -> int:
    """The `twinscale export` command: export, then list what was written."""
    if getattr(args, "export_format", "onnx") != "onnx":
        raise UserError(f"--format {args.export_format}: only onnx is supported")
    source = _local_path(str(args.model))
    model_dir = find_model_dir(source)
    out = Path(args.out) if args.out is not None else model_dir.parent / "onnx"
    result = export_onnx(model_dir, out, quantize=args.quantize == "int8", opset=int(args.opset))
    print(f"exported {model_dir} to {result.out} ({result.config['exporter']} exporter, "
          f"opset {result.config['opset']})")
    for name in result.files:
        print(f"  {name:32s} {_human_size(_size(result.out / name)):>10s}")
    return 0


def find_model_dir(path: Path) -> Path:
    """A run directory's model/ directory, or `path` itself when it is an exported model directory."""
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    raise CheckpointError(f"{path}: not a run directory (no model/config.json) nor an exported model directory "
                          "(no config.json); give a run directory or its model/ directory")


def export_onnx(model_dir: Path, out: Path, quantize: bool = False, opset: int = 18) -> OnnxExport:
    """Export every tower of the model in `model_dir` to `out` (see the module docstring); returns what was written."""
    from trainer.embed import load_model
    from trainer.models.onnx_sides import export_sides

    if opset not in OPSETS:
        raise UserError(f"--opset {opset}: choose an ONNX opset from {OPSETS.start} to {OPSETS.stop - 1}")
    model, document, cfg = load_model(Path(model_dir))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        towers, sides, exporter = export_sides(model, document, cfg, staging, quantize, opset)
        files = tuple(sorted(path.name for path in staging.iterdir()))
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "opset": opset, "exporter": exporter,
                  "source_model": str(Path(model_dir).resolve()), "architecture": document["model"]["architecture"],
                  "towers": towers, "sides": sides, "files": list(files), "rules": RULES}
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _publish(staging, out, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return OnnxExport(out, (*files, CONFIG_NAME), config)


def _publish(staging: Path, out: Path, files: tuple[str, ...]) -> None:
    """Move the staged files into `out`: the old config first out, the new one last in; files of an earlier
    export that this one does not write are removed."""
    out.mkdir(parents=True, exist_ok=True)
    stale = _previous_files(out)
    (out / CONFIG_NAME).unlink(missing_ok=True)
    for name in files:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    for name in stale - set(files):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    _fsync(staging / CONFIG_NAME)
    os.replace(staging / CONFIG_NAME, out / CONFIG_NAME)


def _previous_files(out: Path) -> set[str]:
    try:
        names = json.loads((out / CONFIG_NAME).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    # Only plain names: a tampered config must not make the export delete files outside `out`.
    return {name for name in names if isinstance(name, str) and name and Path(name).name == name and name != ".."}


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def _human_size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def _local_path(model: str) -> Path:
    """A model argument as a local path; a run on object storage is fetched first (its outputs only)."""
    from trainer.data.remote import is_url

    if not is_url(model):
        return Path(model)
    from trainer.remote_runs import fetch_outputs

    url = model.rstrip("/")
    return fetch_outputs(url.rsplit("/", 1)[0]) / "model" if url.endswith("/model") else fetch_outputs(url)
