"""Saving pretrained Hugging Face towers for export: text towers (tower A also as a sentence-transformers model)
and vision towers (the backbone and its image processor's config).

Written without sentence-transformers (a test dependency only), in the layout its loader reads: modules.json →
0_Transformer (the transformers model, tokenizer, sentence_bert_config.json), 1_Pooling, a Dense module for the
model's own pooler (CLS token → dense → tanh) and one for the projection head, and Normalize; the prompts of the
two sides are named `query` (side a, the default of `encode`) and `document` (side b), as `encode_query` and
`encode_document` expect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainer.config import ModelConfig
from trainer.models.towers import InputSpec, build_model

ST_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "pooler": "pooling_mode_cls_token",
              "last": "pooling_mode_lasttoken"}


def save_hf_towers(state: dict[str, torch.Tensor], cfg: ModelConfig, spec_a: InputSpec, spec_b: InputSpec | None,
                   hf_sides: dict[str, str], out_dir: Path) -> dict[str, torch.Tensor]:
    """Save each hf text tower's backbone (adapters merged) and tokenizer under `out_dir/hf_sides[side]`, plus the
    sentence-transformers modules of tower A; return `state` without the saved backbones' tensors."""
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    model = build_model(cfg, spec_a, spec_b)
    model.load_state_dict(state, strict=True)
    for side, name in hf_sides.items():
        tower = model.tower_b if side == "b" and model.tower_b is not None else model.tower_a
        encoder: Any = tower.encoder
        if not hasattr(encoder, "merged_backbone"):  # a vision tower: the model and its processor's config
            save_vision_tower(encoder, out_dir / name)
            continue
        backbone = encoder.merged_backbone()
        backbone.save_pretrained(out_dir / name, safe_serialization=True)
        AutoTokenizer.from_pretrained(encoder.source).save_pretrained(out_dir / name)
        _write_json(out_dir / name / "sentence_bert_config.json", {"max_seq_length": cfg.max_length,
                                                                  "do_lower_case": False})
        if side == "a":
            _write_st_modules(out_dir, cfg, backbone, state, name)
    return {key: value for key, value in state.items()
            if not key.startswith(tuple(f"tower_{side}.encoder." for side in hf_sides))}


def save_vision_tower(encoder: Any, directory: Path) -> None:
    """A vision tower's backbone (`save_pretrained`) and its image processor's config, as transformers reads them."""
    encoder.model.save_pretrained(directory, safe_serialization=True)
    source = Path(encoder.source)
    if (source / "preprocessor_config.json").is_file():  # a local directory: copied as is
        (directory / "preprocessor_config.json").write_bytes((source / "preprocessor_config.json").read_bytes())
        return
    from transformers import AutoImageProcessor

    try:  # a hub id in the local cache
        AutoImageProcessor.from_pretrained(encoder.source).save_pretrained(directory)
    except (OSError, ValueError):
        pass  # no processor: the export's config.json still records the preprocessing Twinscale used


def _write_st_modules(out_dir: Path, cfg: ModelConfig, backbone: Any, state: dict[str, torch.Tensor],
                      transformer_dir: str) -> None:
    hidden = int(backbone.config.hidden_size)
    modules = [_module(0, transformer_dir, "Transformer")]
    _write_json(out_dir / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden, **{flag: False for flag in set(ST_POOLING.values())},
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        ST_POOLING[cfg.pooling]: True, "include_prompt": True})
    modules.append(_module(1, "1_Pooling", "Pooling"))
    if cfg.pooling == "pooler":  # the model's pooler: dense + tanh over the first token
        pooler = backbone.pooler.dense
        modules.append(_dense(out_dir, len(modules), pooler.weight, pooler.bias, "torch.nn.modules.activation.Tanh"))
    if "tower_a.head.weight" in state:
        modules.append(_dense(out_dir, len(modules), state["tower_a.head.weight"], state["tower_a.head.bias"],
                              "torch.nn.modules.linear.Identity"))
    normalize = f"{len(modules)}_Normalize"
    (out_dir / normalize).mkdir()
    modules.append(_module(len(modules), normalize, "Normalize"))
    _write_json(out_dir / "modules.json", modules)
    prompts = {name: cfg.prompts[side] for side, name in (("a", "query"), ("b", "document")) if cfg.prompts.get(side)}
    _write_json(out_dir / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": prompts,
        "default_prompt_name": "query" if "query" in prompts else None, "similarity_fn_name": "cosine"})


def _dense(out_dir: Path, index: int, weight: torch.Tensor, bias: torch.Tensor, activation: str) -> dict[str, Any]:
    name = f"{index}_Dense"
    out_features, in_features = weight.shape
    _write_json(out_dir / name / "config.json", {"in_features": int(in_features), "out_features": int(out_features),
                                                 "bias": True, "activation_function": activation})
    tensors = {"linear.weight": weight.detach().float().contiguous().clone(),
               "linear.bias": bias.detach().float().contiguous().clone()}
    save_file(tensors, str(out_dir / name / "model.safetensors"))
    return _module(index, name, "Dense")


def _module(index: int, path: str, kind: str) -> dict[str, Any]:
    return {"idx": index, "name": str(index), "path": path, "type": f"sentence_transformers.models.{kind}"}


def _write_json(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
