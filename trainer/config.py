"""Typed run configuration: one section per concern, validated when it is built.

A recipe is a YAML file holding only what differs from the defaults below; `load(path, overrides)` merges
dotted overrides (`loss.margin=0.3`) into it and validates the result. An unknown key, a wrong type or an
impossible combination raises `ConfigError` naming the key and the file, before anything starts.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from trainer.errors import ConfigError


def _default_recipe() -> Path:
    """The digits demo recipe: inside the installed package (a wheel ships configs/ as trainer/configs/), else
    in the repository's configs/ (a checkout, or an editable install)."""
    packaged = Path(__file__).resolve().parent / "configs" / "default.yaml"
    return packaged if packaged.is_file() else Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


DEFAULT_RECIPE = _default_recipe()


class Section(BaseModel):
    """A config section: unknown keys and wrong types are errors; every field has a docstring."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, frozen=True)


class ImageConfig(Section):
    """Image views (trainer/data/transforms.py): decoded from their original bytes at any size, then a random
    resized crop + flip (+ colour jitter) in training, shorter-side resize + centre crop in evaluation; seeded by
    (seed, epoch, sample key, view) only, so resume stays exact and views do not depend on the loader workers."""

    size: int | None = Field(None, ge=1)
    """Side of the square model input in pixels. null: the pretrained tower's image processor size (model.encoder
    hf); required for cnn and module towers on images of any size; with shards of one declared size and the cnn
    encoder, null keeps the old path (pixels as stored, in [0, 1], no augmentation)."""
    crop_scale: tuple[float, float] = Field((0.08, 1.0), strict=False)
    """Training crop: range of the crop's area as a fraction of the image's (torchvision's RandomResizedCrop)."""
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), strict=False)
    """Training crop: range of the crop's aspect ratio (width / height), drawn log-uniformly."""
    flip: bool = True
    """Training: mirror left–right with probability 1/2 (false for text, digits or other chiral images)."""
    color_jitter: float = Field(0.0, ge=0.0, lt=1.0)
    """Training: brightness, contrast and saturation each scaled by a factor drawn from [1 − j, 1 + j] (0: off)."""
    resize: int | None = Field(None, ge=1)
    """Evaluation: the shorter side is resized to this before the centre crop of `size`; null: round(size / 0.875)
    (224 → 256, as ImageNet evaluation)."""
    mean: tuple[float, ...] | None = Field(None, strict=False)
    """Per-channel mean subtracted from pixels in [0, 1]. null: the pretrained processor's image_mean (hf towers),
    else ImageNet's (0.485, 0.456, 0.406), what torchvision/timm backbones expect; [0] with std [1] disables it."""
    std: tuple[float, ...] | None = Field(None, strict=False)
    """Per-channel standard deviation pixels are divided by; null as `mean` (ImageNet: 0.229, 0.224, 0.225)."""

    @model_validator(mode="after")
    def _check(self) -> ImageConfig:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"data.image.crop_scale: {list(self.crop_scale)} must satisfy 0 < low ≤ high ≤ 1")
        low, high = self.crop_ratio
        if not 0.0 < low <= high:
            raise ValueError(f"data.image.crop_ratio: {list(self.crop_ratio)} must satisfy 0 < low ≤ high")
        if self.resize is not None and self.size is not None and self.resize < self.size:
            raise ValueError(f"data.image.resize: {self.resize} is smaller than data.image.size {self.size}; the "
                             "centre crop must fit in the resized image")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, 3):
                raise ValueError(f"data.image.{name}: {list(values)} needs 1 value (gray or all channels) or 3 (RGB)")
        if self.std is not None and any(value <= 0 for value in self.std):
            raise ValueError(f"data.image.std: {list(self.std)} must be positive")
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.image.mean and data.image.std: set both or neither")
        return self


class DataConfig(Section):
    """Where the shards are and how they are streamed."""

    train: str = "data/digits/train"
    """Training shards: a Twinscale shard directory (holding index.json), or a WebDataset set with data.fields — a
    brace pattern, glob or list of tar paths/URLs (s3://, gs://, https://, pipe:); a YAML list is joined with ::."""
    test: str | None = "data/digits/test"
    """Held-out shards used for evaluation, named as `train`; null disables evaluation."""
    fields: dict[str, str] | None = None
    """Field map of a WebDataset set not written by Twinscale: view → member extensions (`jpg;png;webp`), plus
    `label` (a member such as `cls`, or `json.KEY`) and, for pairs, `similar`; only mapped members are read."""
    index: str | None = None
    """Sample-count index of `train` (`twinscale scan`), a path or URL; null: index.json next to the shards."""
    test_index: str | None = None
    """Sample-count index of `test`, as `index`."""
    epoch_samples: int | None = Field(None, ge=1)
    """Resampled training: samples per epoch over all workers, shards drawn with replacement, seeded by (seed,
    epoch, rank, worker); for sets too large to scan (no counts needed). null: every sample once per epoch."""
    source: str | None = None
    """If set and `train` has no shards yet, write them first from this source (e.g. `digits`)."""
    source_as_images: bool = False
    """Write `source` items as PNG images (the digits source can be vectors or 8x8 images)."""
    source_kind: Literal["labeled", "pairs", "triplets"] = "labeled"
    """Kind of shards written from `source` (`twinscale shards --kind`); a pairs/triplets file needs its own kind."""
    samples_per_shard: int = Field(128, ge=1)
    """Samples per tar file when shards are written from `source` (`--samples-per-shard`)."""
    pairs_per_item: int = Field(1, ge=1)
    """Pairs or triplets sampled per labeled item when `source_kind` is pairs/triplets (`--pairs-per-item`)."""
    test_fraction: float = Field(0.4, gt=0.0, lt=1.0)
    """Stratified held-out fraction used when shards are written from `source`."""
    batch_size: int = Field(64, ge=2)
    """Samples per batch on each worker (the global batch is this times the number of workers)."""
    shuffle_buffer: int = Field(512, ge=0)
    """Size of the in-stream sample shuffle buffer (0 disables it)."""
    loader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = 1
    """DataLoader processes per worker (0 reads in the training process), or `auto`: min(dist.cpus_per_worker − 1,
    training shards per rank, 4), at least 0, resolved when the epoch is planned (the same on every rank)."""
    _cpus_per_worker: int = PrivateAttr(1)
    """dist.cpus_per_worker of the run (set by Config), the CPU budget `auto` loader workers share."""
    on_corrupt: Literal["skip", "raise"] = "skip"
    """What a corrupt or incomplete sample does: skipped and counted, or an error."""
    text_buckets: int = Field(2**18, ge=16)
    """Hash buckets of the text encoder's n-gram vocabulary."""
    text_ngrams: tuple[int, int] = Field((1, 3), strict=False)
    """Smallest and largest character n-gram length hashed for text fields."""
    classes_per_batch: int | None = Field(None, ge=2)
    """P of P×K training batches: classes per local batch, from labeled shards (null: batches in stream order)."""
    samples_per_class: int = Field(2, ge=2)
    """K of P×K training batches: samples of each chosen class; batch_size must equal P × K."""
    class_buffer: int | None = Field(None, ge=2)
    """Most samples one loader worker buffers for P×K batches (null: 8 × batch_size); overflow is dropped."""
    image: ImageConfig = ImageConfig()
    """How image views are decoded, augmented (training) and resized (evaluation, `twinscale embed`)."""

    train_weights: tuple[float, ...] | None = Field(None, strict=False)
    """Mixing weights of the `::`-separated sources of `train`, in order; set by the list form
    `train: [{path: A, weight: 0.7}, {path: B, weight: 0.3}]`, which needs data.epoch_samples."""

    def workers_for(self, shards: int, world_size: int) -> int:
        """DataLoader processes per rank: `loader_workers`, or the `auto` rule for `shards` training shards."""
        if self.loader_workers != "auto":
            return self.loader_workers
        return max(0, min(self._cpus_per_worker - 1, shards // max(1, world_size), 4))

    @model_validator(mode="before")
    @classmethod
    def _split_sources(cls, raw: Any) -> Any:
        # `train: [{path, weight}, ...]` (mixing) becomes one `::` spec plus its weights, so `train` stays a string.
        train = raw.get("train") if isinstance(raw, dict) else None
        if isinstance(train, list) and any(isinstance(item, dict) for item in train):
            if not all(isinstance(item, dict) and set(item) <= {"path", "weight"} and "path" in item for item in train):
                raise ValueError("data.train: a list of sources is [{path: SPEC, weight: W}, ...]")
            weights = [item.get("weight", 1.0) for item in train]
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights):
                raise ValueError(f"data.train: source weights must be positive numbers, got {weights}")
            raw = {**raw, "train": "::".join(str(item["path"]) for item in train),
                   "train_weights": tuple(float(w) for w in weights)}
        return raw

    @model_validator(mode="after")
    def _check_mixing(self) -> DataConfig:
        if self.train_weights is not None:
            if len(self.train_weights) != len(self.train.split("::")):
                raise ValueError(f"data.train_weights: {len(self.train_weights)} weights for "
                                 f"{len(self.train.split('::'))} sources of data.train")
            if self.epoch_samples is None:
                raise ValueError("data.epoch_samples: mixing sources (data.train as a list with weights) draws "
                                 "shards by weight, so it needs an epoch length; set data.epoch_samples")
        return self

    @field_validator("train", "test", mode="before")
    @classmethod
    def _join_shard_list(cls, value: Any) -> Any:
        # A YAML list of tar paths/URLs is one spec joined with WebDataset's `::`.
        return "::".join(str(item) for item in value) if isinstance(value, list) else value

    @field_validator("fields")
    @classmethod
    def _check_fields(cls, fields: dict[str, str] | None) -> dict[str, str] | None:
        if fields is not None:
            from trainer.data.shardsets import parse_fields  # late: the data package imports this module

            parse_fields(fields)
        return fields

    @model_validator(mode="after")
    def _check_class_balance(self) -> DataConfig:
        if self.classes_per_batch is None:
            if self.class_buffer is not None:
                raise ValueError("data.class_buffer: only P×K batches use it; set data.classes_per_batch too, or "
                                 "remove data.class_buffer")
            return self
        product = self.classes_per_batch * self.samples_per_class
        if self.batch_size != product:
            raise ValueError(f"data.batch_size: P×K batches hold data.classes_per_batch × data.samples_per_class = "
                             f"{self.classes_per_batch} × {self.samples_per_class} = {product} samples, but "
                             f"data.batch_size is {self.batch_size}; set data.batch_size={product}")
        if self.class_buffer is not None and self.class_buffer < product:
            raise ValueError(f"data.class_buffer: {self.class_buffer} cannot hold one P×K batch of {product} "
                             f"samples; set it to at least {product} (null: 8 × data.batch_size)")
        return self


class LoraConfig(Section):
    """Low-rank adapters (peft) on an hf tower: the backbone stays frozen, only the adapters and the head train."""

    r: int = Field(8, ge=1)
    """Rank of the adapters."""
    alpha: int = Field(16, ge=1)
    """Scale numerator: adapters add (alpha / r) · B·A."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input."""
    target_modules: tuple[str, ...] | None = Field(None, strict=False)
    """Module names to adapt (e.g. [query, value]); null: peft's default for the model type."""


class ModelConfig(Section):
    """Towers and encoders."""

    architecture: Literal["siamese", "pseudo_siamese"] = "siamese"
    """`siamese`: one shared tower; `pseudo_siamese`: tower A for anchors/`a`, tower B for the other side."""
    encoder: Literal["mlp", "cnn", "text", "hf", "module"] = "mlp"
    """Encoder of tower A (and of the shared tower); `hf`: a pretrained Hugging Face model (`pretrained`);
    `module`: your own torch module (`module`, `module_args`)."""
    encoder_b: Literal["mlp", "cnn", "text", "hf", "module"] | None = None
    """Encoder of tower B for pseudo-Siamese models; null means the same kind as `encoder`."""
    pretrained: str | None = None
    """encoder=hf: a local model directory (AutoModel + tokenizer; always offline) or a hub id (HF_HUB_OFFLINE
    respected)."""
    pretrained_b: str | None = None
    """encoder_b=hf: tower B's model directory or hub id; null means the same as `pretrained`."""
    module: str | None = None
    """encoder=module: `package.module:factory`, a callable returning an nn.Module that maps a batch (images: float
    [B, C, H, W] normalised as data.image says) to features [B, D]; D is its `out_dim` attribute, else measured
    with one dummy forward. Weights: `pretrained` as .safetensors or a state dict (read with weights_only=True)."""
    module_args: dict[str, Any] = Field(default_factory=dict)
    """encoder=module: keyword arguments passed to the factory (JSON-able; saved with the exported model)."""
    pooling: Literal["mean", "cls", "last", "pooler"] = "mean"
    """hf text towers: mean of token states, the first ([CLS]) or last real token, or the model's own pooler."""
    max_length: int = Field(128, ge=1)
    """hf text towers: tokens per text (longer texts are truncated); batches are padded to their longest text."""
    prompts: dict[str, str] = Field(default_factory=dict)
    """hf text towers: text put before every input of a side, e.g. {a: "query: ", b: "passage: "}."""
    freeze: tuple[str, ...] = Field((), strict=False)
    """Parameter-name patterns (fnmatch, e.g. `tower_a.encoder.backbone.embeddings.*`) kept fixed in training."""
    gradient_checkpointing: bool = False
    """hf towers: recompute activations in backward (less memory, about a third more compute)."""
    lora: LoraConfig | None = None
    """hf towers: train low-rank adapters (peft) instead of the backbone; merged into its weights on export."""
    hidden_dims: tuple[int, ...] = Field((256, 256), strict=False)
    """Hidden layer widths of the MLP encoder."""
    channels: tuple[int, ...] = Field((32, 64), strict=False)
    """Convolution channels of the CNN encoder, one stage (conv-norm-relu ×2, pool) per entry."""
    text_dim: int = Field(128, ge=1)
    """Width of the text encoder's n-gram embedding bag."""
    embedding_dim: int | None = Field(64, ge=1)
    """Size of the L2-normalised output embedding (a linear projection head); null keeps the encoder's width
    (no head)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout between encoder layers/stages and before the projection head."""

    @model_validator(mode="after")
    def _check_hf(self) -> ModelConfig:
        uses_hf = "hf" in (self.encoder, self.encoder_b)
        if self.encoder == "hf" and self.pretrained is None:
            raise ValueError("model.pretrained: model.encoder=hf needs a model directory or hub id; set "
                             "model.pretrained=DIR_OR_HUB_ID")
        if self.encoder_b == "hf" and self.pretrained is None and self.pretrained_b is None:
            raise ValueError("model.pretrained_b: model.encoder_b=hf needs a model directory or hub id; set "
                             "model.pretrained_b=DIR_OR_HUB_ID")
        if self.pretrained_b is not None and (self.encoder_b or self.encoder) != "hf":
            raise ValueError("model.pretrained_b: tower B is not an hf tower; set model.encoder_b=hf")
        for side in self.prompts:
            if side not in ("a", "b"):
                raise ValueError(f"model.prompts.{side}: prompts are per side; use the keys a and b")
        if not uses_hf and self.lora is not None:
            raise ValueError("model.lora: only hf towers take adapters; set model.encoder=hf (or encoder_b)")
        if not uses_hf and self.gradient_checkpointing:
            raise ValueError("model.gradient_checkpointing: only hf towers support it; set model.encoder=hf")
        return self


LOSSES = ("contrastive", "triplet", "multi_similarity", "supcon", "infonce", "clip")
MINERS = ("none", "batch_hard", "semi_hard", "multi_similarity")


class LossConfig(Section):
    """The metric-learning loss (pytorch-metric-learning)."""

    name: Literal["contrastive", "triplet", "multi_similarity", "supcon", "infonce", "clip"] = \
        "multi_similarity"
    """Loss function; `infonce` is PML's NTXentLoss; `clip` is CLIP's symmetric InfoNCE over the a and b sides of
    pair shards, with a learnable temperature (needs pair shards and mining.name=none)."""
    distance: Literal["cosine", "euclidean", "l1"] = "cosine"
    """Distance between embeddings; supcon, infonce, multi_similarity and clip need cosine."""
    pos_margin: float = 0.0
    """Contrastive: positives are pulled until their distance is below this."""
    neg_margin: float = 1.0
    """Contrastive: negatives are pushed until their distance is above this."""
    margin: float = 0.1
    """Triplet: required gap d(a,n) - d(a,p)."""
    temperature: float = Field(0.1, gt=0.0)
    """SupCon / InfoNCE temperature."""
    alpha: float = 2.0
    """Multi-similarity: weight of positive pairs."""
    beta: float = 50.0
    """Multi-similarity: weight of negative pairs."""
    base: float = 0.5
    """Multi-similarity: similarity offset."""
    clip_temperature: float = Field(0.07, ge=0.01, le=100.0)
    """Clip: initial temperature; the model learns logit_scale = log(1/T), used clamped to ≤ log(100) (T ≥ 0.01)."""
    chunk_entries: int = Field(2**22, ge=1)
    """Anchor × reference entries per chunk of loss + mining: bounds their memory whatever the global batch."""


class MiningConfig(Section):
    """The in-batch miner, run over the global batch (all workers)."""

    name: Literal["none", "batch_hard", "semi_hard", "multi_similarity"] = "multi_similarity"
    """Miner; `none` uses all in-batch pairs (labeled data) or only the explicit pairs/triplets of the shards."""
    margin: float = 0.2
    """Semi-hard: margin of the triplet condition."""
    epsilon: float = 0.1
    """Multi-similarity miner: slack of the hard-pair condition."""
    memory_size: int = Field(0, ge=0)
    """Cross-batch memory (XBM): embeddings of past global batches kept as extra references (0 = off)."""
    memory_start_step: int = Field(0, ge=0)
    """Steps before the memory is used (it fills from the start); early embeddings drift fast."""


class OptimConfig(Section):
    """Optimizer, schedule and run length."""

    lr: float = Field(2e-3, gt=0.0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(1e-4, ge=0.0)
    """AdamW weight decay."""
    lr_groups: dict[str, Annotated[float, Field(strict=False)]] = Field(default_factory=dict)
    """Learning rate per parameter-name pattern (fnmatch; the first matching pattern wins), e.g.
    {"tower_a.encoder.*": 2e-5}: the rest train at `lr`; warm-up and decay scale every group alike."""
    epochs: int = Field(20, ge=1)
    """Passes over the training shards."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many steps (overrides `epochs` when smaller)."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Final learning rate as a fraction of `lr`."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Global gradient-norm clipping (0 disables it)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per step; needs `feature_cache`, so the loss still sees the whole batch as negatives."""
    feature_cache: bool = False
    """GradCache: embed the step's batch in micro-batches without grad, take the loss on all of it, replay each."""
    @field_validator("lr_groups")
    @classmethod
    def _check_lr_groups(cls, groups: dict[str, float]) -> dict[str, float]:
        for pattern, lr in groups.items():
            if not lr > 0:
                raise ValueError(f"optim.lr_groups.{pattern}: a learning rate must be > 0 (got {lr}); freeze "
                                 "parameters with model.freeze instead")
        return groups

    nonfinite: Literal["skip", "stop"] = "skip"
    """What a step whose loss or gradients are NaN or infinite does: skipped without an update, or stops the run."""
    max_nonfinite_steps: int = Field(10, ge=0)
    """Non-finite steps skipped before the run stops anyway (the newest checkpoint stays intact)."""


# Entries of the DeepSpeed config that Twinscale generates from its own keys: setting them in dist.deepspeed would
# silently contradict the run config (the step arithmetic, the schedule, the loss's view of the batch, resume).
DEEPSPEED_OWNED = {
    "train_batch_size": "data.batch_size (per worker; the global batch is data.batch_size × dist.workers)",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "optim.gradient_accumulation_steps (with optim.feature_cache=true)",
    "managed_gradient_accumulation": "optim.feature_cache",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "dist.precision",
    "fp16": "dist.precision (bf16 or fp32; fp16 is not supported)",
    "amp": "dist.precision",
    "optimizer": "optim.lr and optim.weight_decay (the optimizer is AdamW)",
    "scheduler": "optim.warmup_steps and optim.min_lr_ratio",
    "zero_optimization.stage": "dist.zero_stage",
}
# Tuning entries that change speed or diagnostics, never the maths or the checkpoint layout.
DEEPSPEED_EXTRAS = ("steps_per_print", "wall_clock_breakdown", "memory_breakdown", "communication_data_type",
                    "prescale_gradients", "gradient_predivide_factor", "comms_logger", "flops_profiler",
                    "zero_optimization")
DEEPSPEED_ZERO_EXTRAS = ("allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter",
                         "reduce_bucket_size", "contiguous_gradients", "round_robin_gradients")


def check_deepspeed_extras(extra: dict[str, Any]) -> None:
    """Refuse `dist.deepspeed` entries that Twinscale owns (naming the key to use) or does not know to be safe."""
    for key, value in extra.items():
        if key in DEEPSPEED_OWNED:
            raise ValueError(f"dist.deepspeed.{key}: set by Twinscale; use {DEEPSPEED_OWNED[key]}")
        if key not in DEEPSPEED_EXTRAS:
            raise ValueError(f"dist.deepspeed.{key}: not a tuning entry Twinscale passes through; allowed: "
                             f"{', '.join(DEEPSPEED_EXTRAS)}")
        if key != "zero_optimization":
            continue
        if not isinstance(value, dict):
            raise ValueError("dist.deepspeed.zero_optimization: expected a mapping")
        for sub in value:
            if f"{key}.{sub}" in DEEPSPEED_OWNED:
                raise ValueError(f"dist.deepspeed.{key}.{sub}: set by Twinscale; use {DEEPSPEED_OWNED[f'{key}.{sub}']}")
            if sub not in DEEPSPEED_ZERO_EXTRAS:
                raise ValueError(f"dist.deepspeed.{key}.{sub}: not a tuning entry Twinscale passes through; allowed: "
                                 f"{', '.join(DEEPSPEED_ZERO_EXTRAS)}")


class DistConfig(Section):
    """Workers, devices and the DeepSpeed engine."""

    workers: int = Field(2, ge=1)
    """Training processes (one per GPU, or per CPU slot)."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPU cores reserved for, and torch threads used by, each worker."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses a GPU per worker where the cluster has them."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 on GPU, fp32 on CPU."""
    zero_stage: int = Field(0, ge=0, le=2)
    """DeepSpeed ZeRO stage (0, 1 or 2)."""
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """Extra DeepSpeed tuning entries (bucket sizes, overlap_comm, profilers) merged over the generated ones;
    entries Twinscale generates from its own keys (batch sizes, ZeRO stage, precision, optimizer) are refused."""
    timeout_s: int = Field(600, ge=10)
    """Collective timeout, after which a stuck worker fails instead of hanging."""
    max_failures: int = Field(0, ge=-1)
    """Ray: worker-group restarts after a worker dies (-1: unlimited); each restart resumes the newest checkpoint."""

    @field_validator("deepspeed")
    @classmethod
    def _check_deepspeed(cls, extra: dict[str, Any]) -> dict[str, Any]:
        check_deepspeed_extras(extra)
        return extra


class CheckpointConfig(Section):
    """When checkpoints are written and how many are kept."""

    every_steps: int = Field(0, ge=0)
    """Save every N steps (0: only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Complete checkpoints kept; older ones are removed."""


class LogConfig(Section):
    """Console progress and Weights & Biases."""

    wandb: bool = True
    """Log to W&B from rank 0 (offline unless an API key is configured)."""
    project: str = "twinscale"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """`auto`: online when WANDB_API_KEY is set or wandb is logged in, else offline."""
    init_timeout_s: float = Field(10.0, gt=0.0)
    """Seconds to wait for the W&B server before falling back to offline."""
    every_steps: int = Field(10, ge=1)
    """Training metrics are logged every N steps."""


class EvalConfig(Section):
    """Held-out evaluation."""

    every_steps: int = Field(0, ge=0)
    """Evaluate every N steps (0: only at the end)."""
    at_start: bool = True
    """Evaluate once before the first step (`step: 0` in metrics.jsonl): the baseline a run's gains are measured
    from (not repeated on resume)."""
    recall_k: int = Field(10, ge=1)
    """K of recall@K."""
    batch_size: int = Field(512, ge=1)
    """Samples per forward pass when embedding the held-out split."""


class ReportConfig(Section):
    """The run report (RUN/report.html, trainer/report/): written at the end of a run and by `twinscale report`."""

    enabled: bool = True
    """Write report.html (and its figures to W&B) at the end of the run; a failure only warns."""
    max_map_points: int = Field(2000, ge=10, le=100_000)
    """Held-out items (a seeded sample) drawn in the 2-D map of embeddings."""
    gallery_queries: int = Field(4, ge=0, le=50)
    """Queries in each nearest-neighbour gallery (a seeded choice, and as many of the worst ones)."""
    neighbours: int = Field(5, ge=1, le=50)
    """Neighbours shown per gallery query."""


class Config(Section):
    """A whole run."""

    name: str | None = None
    """Run name: outputs go to `<output_dir>/<name>/`; unset means `<recipe>-<date>-<time>`."""
    output_dir: str = "runs"
    """Parent directory of run directories, or a URL (`s3://bucket/runs`): the run is then published there
    (checkpoints atomically, run_state.json last) from a local mirror under $TWINSCALE_RUN_CACHE."""
    seed: int = 0
    """Seed of model init, shard order, shuffling and mining."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    mining: MiningConfig = MiningConfig()
    optim: OptimConfig = OptimConfig()
    dist: DistConfig = DistConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()
    report: ReportConfig = ReportConfig()

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str | None) -> str | None:
        # The run directory is output_dir/name: a name that is not one plain path component would put the run,
        # and everything it deletes when pruning checkpoints, outside output_dir.
        if name is not None and (problem := _path_component_problem(name)):
            raise ValueError(f"name: {name!r} {problem}; use a plain name such as digits-run1")
        return name

    @field_validator("output_dir")
    @classmethod
    def _check_output_dir(cls, output_dir: str) -> str:
        if not output_dir.strip() or any(ord(char) < 32 or ord(char) == 127 for char in output_dir):
            raise ValueError(f"output_dir: {output_dir!r} is empty or holds control characters")
        return output_dir

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        if self.loss.name == "clip":
            _check_clip(self)
        if self.loss.name in ("supcon", "infonce", "multi_similarity", "clip") and self.loss.distance != "cosine":
            raise ValueError(f"loss.distance: {self.loss.name} is defined on cosine similarity, not "
                             f"{self.loss.distance}; set loss.distance=cosine")
        if self.optim.gradient_accumulation_steps > 1 and not self.optim.feature_cache:
            raise ValueError("optim.gradient_accumulation_steps: every supported loss uses in-batch negatives, "
                             "and plain gradient accumulation would shrink each step's pool of negatives to one "
                             "micro-batch; set optim.feature_cache=true to embed the batch in micro-batches while "
                             "the loss still sees all of it")
        if self.optim.gradient_accumulation_steps > self.data.batch_size:
            raise ValueError(f"optim.gradient_accumulation_steps: {self.optim.gradient_accumulation_steps} "
                             f"micro-batches cannot split a data.batch_size of {self.data.batch_size}")
        if self.model.encoder_b is not None and self.model.architecture == "siamese":
            raise ValueError("model.encoder_b: a siamese model has one shared tower; set "
                             "model.architecture=pseudo_siamese to give tower B its own encoder")
        self.data._cpus_per_worker = self.dist.cpus_per_worker  # for data.loader_workers: auto
        return self

    @property
    def run_dir(self) -> Path:
        """Directory holding everything this run writes."""
        if self.name is None:
            raise ConfigError("name: the run has no name yet; set one with --set name=NAME")
        if "://" in self.output_dir:  # object storage: the run works in a local mirror (trainer.remote_runs)
            from trainer.remote_runs import local_mirror

            return local_mirror(f"{self.output_dir.rstrip('/')}/{self.name}")
        return Path(self.output_dir) / self.name


def _check_clip(cfg: Config) -> None:
    """Clip scores a pair's a against every b (and back): it needs pairs, and it mines nothing."""
    if cfg.mining.name != "none":
        raise ValueError(f"mining.name: loss.name=clip uses every a×b pair of the global batch and mines nothing, "
                         f"but mining.name is {cfg.mining.name}; set mining.name=none")
    if cfg.data.source is not None and cfg.data.source_kind != "pairs":
        raise ValueError(f"data.source_kind: loss.name=clip needs pair shards (a, b), but data.source_kind is "
                         f"{cfg.data.source_kind}; set data.source_kind=pairs or choose another loss.name")


def _path_component_problem(name: str) -> str | None:
    """Why `name` is not a single, visible path component, or None."""
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if name.startswith("."):
        return "starts with a dot (., .. and hidden directories are refused)"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "holds control characters"
    return None


def string_override(key: str, value: str) -> str:
    """A `--set` override that keeps `value` a string: overrides are parsed as YAML, which would read a run named
    `38404_00001` (a Ray Tune trial id) as the integer 3840400001. A JSON string is a YAML string."""
    return f"{key}={json.dumps(value)}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (["a", "b"], value), the value parsed as YAML (`0.3` → float, `[1,2]` → list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set loss.margin=0.3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({error})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each dotted override set (sections are created as needed)."""
    merged = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (the default digits recipe when `path` is None), apply overrides, validate."""
    source = Path(path) if path is not None else DEFAULT_RECIPE
    raw = read_yaml(source)
    return from_dict(apply_overrides(raw, list(overrides or [])), origin=str(source))


def read_yaml(source: Path) -> dict[str, Any]:
    """Parse a recipe file into a mapping, with errors that name the file."""
    if not source.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections at the top level")
    return raw


def from_dict(raw: dict[str, Any], origin: str = "<config>") -> Config:
    """Validate a plain mapping into a Config, turning pydantic's report into one line per problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, origin)) from None


def to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (tuples become lists)."""
    return config.model_dump(mode="json")


def dump(config: Config, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _describe(error: ValidationError, origin: str) -> str:
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            lines.append(f"{origin}: {key}: unknown key{_suggest(problem['loc'])}")
        elif problem["type"] == "value_error":
            lines.append(f"{origin}: {problem['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{origin}: {key}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def _suggest(location: tuple[Any, ...]) -> str:
    section: type[BaseModel] = Config
    for part in location[:-1]:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        section = annotation
    close = difflib.get_close_matches(str(location[-1]), list(section.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {key: _deep_copy(value) if isinstance(value, dict) else value for key, value in raw.items()}
