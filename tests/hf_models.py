"""Tiny randomly initialised Hugging Face text models saved to a directory, loaded like real pretrained weights."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a an of to and in is was for on with as by at from that this it be are or not "
         "dog cat bird fish tree car house water fire sun moon star road city river light dark small large "
         "animal plant vehicle building run walk eat drink sleep read write red green blue query passage").split()


def write_vocab(path: Path) -> Path:
    """A WordPiece vocabulary: special tokens, the words above, single letters and their ## continuations."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,:;!?'-()")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *(f"##{c}" for c in letters)]
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    return path


def save_tiny_bert(directory: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer, written with save_pretrained (safetensors)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(directory / "vocab.txt")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
