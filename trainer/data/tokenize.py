"""Text preprocessing of a pretrained Hugging Face tower: prompt + text per sample, one tokenizer call per batch.

`TokenizerPreprocessor` is a `Preprocessor` (see trainer/data/preprocess.py): `prepare` decodes a txt member and
puts the side's prompt in front; `collate` tokenizes the batch at once (fast tokenizers batch in Rust), truncated
to `max_length` and right-padded to the batch's longest text (dynamic padding) → `TokenBatch`. The tokenizer is
loaded lazily in each process that uses it (DataLoader workers unpickle the preprocessor without it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer.data.formats import TokenBatch
from trainer.data.preprocess import Preprocessor, SampleContext


def _quiet_tokenizers() -> None:
    # A fast tokenizer used before a fork deadlocks or warns in the children; batches are tokenized one per loader
    # worker, so its own thread pool buys nothing there.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class TokenizerPreprocessor(Preprocessor):
    """txt members → `prompt + text` → a padded `TokenBatch` (token ids and attention mask) per batch."""

    def __init__(self, source: str, max_length: int, prompt: str = "") -> None:
        self.source, self.max_length, self.prompt = str(source), int(max_length), prompt
        self._tokenizer: Any = None
        _quiet_tokenizers()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}  # each process loads its own

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer of `source`, loaded on first use in this process (right padding)."""
        if self._tokenizer is None:
            _quiet_tokenizers()
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.source)
            tokenizer.padding_side = "right"  # TokenBatch.rows and last-token pooling assume it
            self._tokenizer = tokenizer
        return self._tokenizer

    def prepare(self, data: bytes, ext: str, context: SampleContext) -> str:
        return self.prompt + data.decode("utf-8")

    def collate(self, rows: list[Any]) -> TokenBatch:
        return self.tokenize(rows)

    def tokenize(self, texts: list[str]) -> TokenBatch:
        """Texts that already carry their prompt → one padded batch."""
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return TokenBatch(encoded["input_ids"].long(), encoded["attention_mask"].long())

    def with_source(self, source: str) -> TokenizerPreprocessor:
        """The same preprocessing reading the tokenizer from `source` (an exported copy of it)."""
        return TokenizerPreprocessor(source, self.max_length, self.prompt)

    def to_dict(self) -> dict[str, Any]:
        return {"name": "tokenizer", "source": self.source, "max_length": self.max_length, "prompt": self.prompt}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base: Path | None = None) -> TokenizerPreprocessor:
        """Inverse of `to_dict`; a relative `source` is resolved against `base` (an exported model directory)."""
        source = str(raw["source"])
        if base is not None and not Path(source).is_absolute() and (Path(base) / source).is_dir():
            source = str(Path(base) / source)
        return cls(source, int(raw["max_length"]), str(raw.get("prompt", "")))
