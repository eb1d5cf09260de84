"""The work of `twinscale export --format onnx` per tower and per side (trainer/models/onnx_export.py drives it).

`export_sides` exports each tower once (tower A; tower B of a pseudo-Siamese model) with `export_graph`, checks
the ONNX graph against torch on its trace inputs with onnxruntime, quantizes it on request (`quantize_int8`), and
describes each side (a, b): the tower file that embeds it and its preprocessing, with hf tokenizers copied next
to the graphs. A Siamese model has one tower file and still two sides (their prompts may differ).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import Config
from trainer.data.preprocess import (
    ArrayPreprocessor,
    HashedTextPreprocessor,
    PixelPreprocessor,
    Preprocessor,
)
from trainer.errors import CheckpointError
from trainer.models.onnx_towers import OUTPUT_NAME, TowerGraph, tower_graph
from trainer.models.towers import EmbeddingModel, InputSpec, Tower

PARITY_COSINE = 0.999
"""Least cosine between torch and onnxruntime embeddings of the trace inputs for an export to be kept."""
# What onnxruntime's dynamic quantization rewrites: the weights of matrix products (every transformer and MLP
# layer, every projection head) and embedding tables (Gather: the n-gram bag's table). Conv stays in float:
# onnxruntime's CPU ConvInteger does not take int8 (QInt8) weights. Measured on MiniLM (128 WordNet glosses, least
# cosine to torch): all MatMuls per tensor 0.92; per channel 0.98; also keeping the MatMuls fed by a GELU (the FFN
# down-projections, whose inputs have outliers that per-tensor uint8 activations clip) in float 0.990; also
# keeping the token embeddings (Gather) in float 0.992 (hf text towers: 69 MB instead of 33, fp32 91 MB).
QUANTIZED_OPS = ["MatMul", "Gemm", "Gather"]
HF_TEXT_QUANTIZED_OPS = ["MatMul", "Gemm"]


def export_sides(model: EmbeddingModel, document: dict[str, Any], cfg: Config, staging: Path, quantize: bool,
                 opset: int) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Export the towers into `staging`; returns onnx_config.json's `towers` and `sides`, and the exporter used."""
    towers: dict[str, Any] = {}
    sides: dict[str, Any] = {}
    exporters: set[str] = set()
    tokenizer_dirs: dict[str, str] = {}
    for side in ("a", "b"):
        tower_name = "a" if model.tower_b is None else side
        spec = _spec(document, tower_name)
        preprocessor = side_preprocessor(model, cfg, spec, side)
        description = preprocessor.to_dict()
        if description["name"] == "tokenizer":
            description["source"] = _copy_tokenizer(preprocessor, staging, side, tokenizer_dirs)
        if tower_name not in towers:
            tower = model.tower_a if tower_name == "a" else model.tower_b
            assert tower is not None
            image_size = description.get("size") if description["name"] == "image" else None
            entry, exporter = _export_tower(tower, spec, image_size, staging / f"tower_{tower_name}.onnx",
                                            quantize, opset)
            towers[tower_name] = entry
            exporters.add(exporter)
        sides[side] = {"tower": tower_name, "preprocessing": description}
    return towers, sides, "+".join(sorted(exporters))


def _spec(document: dict[str, Any], side: str) -> InputSpec:
    inputs = document["inputs"]
    return InputSpec.from_dict(inputs.get(side) or inputs["a"])


def side_preprocessor(model: EmbeddingModel, cfg: Config, spec: InputSpec, side: str) -> Preprocessor:
    """The preprocessing of `side`: the export's own (config.json), else the default of its inputs (arrays,
    fixed-size pixels, the run's hashed n-grams), as `twinscale embed` would use."""
    exported: dict[str, Preprocessor] = dict(getattr(model, "preprocessing", None) or {})
    if side in exported:
        return exported[side]
    if model.is_siamese and "a" in exported:
        return exported["a"]
    if spec.modality == "text":
        return HashedTextPreprocessor(cfg.data.text_buckets, (cfg.data.text_ngrams[0], cfg.data.text_ngrams[1]))
    if spec.modality == "image":
        return PixelPreprocessor((spec.shape[0], spec.shape[1], spec.shape[2]))
    return ArrayPreprocessor(spec.shape)


def _copy_tokenizer(preprocessor: Preprocessor, staging: Path, side: str, written: dict[str, str]) -> str:
    """Save the side's tokenizer as `tokenizer_<side>/` (once per distinct tokenizer); its directory name."""
    from trainer.data.tokenize import TokenizerPreprocessor

    assert isinstance(preprocessor, TokenizerPreprocessor)
    source = preprocessor.source
    if source not in written:
        name = f"tokenizer_{side}"
        preprocessor.tokenizer.save_pretrained(str(staging / name))
        written[source] = name
    return written[source]


def _export_tower(tower: Tower, spec: InputSpec, image_size: int | None, path: Path, quantize: bool,
                  opset: int) -> tuple[dict[str, Any], str]:
    graph = tower_graph(tower, spec, image_size)
    exporter = export_graph(graph, path, opset)
    cosine = check_parity(graph, path)
    entry: dict[str, Any] = {
        "file": path.name, "encoder": graph.kind, "inputs": [item.to_dict() for item in graph.inputs],
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", graph.out_dim], "dim": graph.out_dim},
        "l2_normalized": True, "trace_cosine": cosine, "int8_file": None,
    }
    if quantize:
        int8_path = path.with_name(path.stem + ".int8.onnx")
        quantize_int8(path, int8_path, HF_TEXT_QUANTIZED_OPS if graph.kind == "hf_text" else QUANTIZED_OPS)
        entry["int8_file"] = int8_path.name
        entry["int8_trace_cosine"] = check_parity(graph, int8_path, least=None)
    return entry, exporter


def export_graph(graph: TowerGraph, path: Path, opset: int) -> str:
    """Write `graph` to `path` as ONNX with dynamic batch/sequence axes; returns the exporter that did it."""
    names = [item.name for item in graph.inputs]
    with _quiet_exporter():
        try:
            _export_dynamo(graph, path, opset, names)
            return "dynamo"
        except Exception as dynamo_error:  # noqa: BLE001 - torch.export fails many ways on user code: try the other
            try:
                _export_torchscript(graph, path, opset, names)
                return "torchscript"
            except Exception as error:  # noqa: BLE001
                raise CheckpointError(f"cannot export the {graph.kind} tower to ONNX: dynamo exporter: "
                                      f"{_first_line(dynamo_error)}; TorchScript exporter: {_first_line(error)}"
                                      ) from None


def _export_dynamo(graph: TowerGraph, path: Path, opset: int, names: list[str]) -> None:
    dims = {axis: torch.export.Dim(axis) for item in graph.inputs for axis in item.shape if isinstance(axis, str)}
    # Positional (a tuple): the wrapper's argument names need not match the graph's input names.
    shapes = tuple({index: dims[axis] for index, axis in enumerate(item.shape) if isinstance(axis, str)}
                   for item in graph.inputs)
    # One file (no external data) below protobuf's 2 GB limit; bigger models keep their weights beside it.
    large = sum(p.numel() * p.element_size() for p in graph.module.parameters()) > 1.8 * 2**30
    torch.onnx.export(graph.module, graph.dummy, str(path), input_names=names, output_names=[OUTPUT_NAME],
                      opset_version=opset, dynamo=True, dynamic_shapes=shapes, external_data=large, verbose=False)


def _export_torchscript(graph: TowerGraph, path: Path, opset: int, names: list[str]) -> None:
    axes = {item.name: {index: axis for index, axis in enumerate(item.shape) if isinstance(axis, str)}
            for item in graph.inputs}
    axes[OUTPUT_NAME] = {0: "batch"}
    torch.onnx.export(graph.module, graph.dummy, str(path), input_names=names, output_names=[OUTPUT_NAME],
                      opset_version=opset, dynamo=False, dynamic_axes=axes)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' warnings (deprecations, torchvision absent) while they run."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def check_parity(graph: TowerGraph, path: Path, least: float | None = PARITY_COSINE) -> float:
    """Least cosine between torch and onnxruntime on the trace inputs; CheckpointError below `least`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {item.name: tensor.numpy() for item, tensor in zip(graph.inputs, graph.dummy, strict=True)}
    ours = session.run([OUTPUT_NAME], feeds)[0]
    with torch.no_grad():
        theirs = graph.module(*graph.dummy).numpy()
    cosine = float(np.min(np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1) *
                                                          np.linalg.norm(theirs, axis=1) + 1e-12)))
    if least is not None and not cosine >= least:
        raise CheckpointError(f"{path.name}: onnxruntime disagrees with torch on the {graph.kind} tower (cosine "
                              f"{cosine:.4f} < {least}); this tower cannot be exported faithfully")
    return round(cosine, 6)


def quantize_int8(source: Path, target: Path, op_types: list[str] = QUANTIZED_OPS) -> None:
    """onnxruntime's dynamic quantization (QInt8 weights), after its recommended pre-processing (graph
    optimisation and ONNX shape inference; its symbolic shape inference fails on the dynamo exporter's graphs)
    when that succeeds."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(target.stem + ".pre.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        model_input = prepared
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation: quantize the plain graph instead
        model_input = source
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns through the root logger even after pre-processing
    try:
        quantize_dynamic(str(model_input), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=op_types, nodes_to_exclude=gelu_fed_matmuls(model_input))
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)


def gelu_fed_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose input is a GELU's output (by op type, or the dynamo exporter's value name)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    gelu_values = {output for node in graph.node for output in node.output
                   if node.op_type == "Gelu" or output.startswith("gelu")}
    return [node.name for node in graph.node if node.op_type == "MatMul" and node.input[0] in gelu_values]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
