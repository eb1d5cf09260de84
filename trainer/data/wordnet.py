"""WordNet gloss → lemma pairs, split by synset, written as pair shards (the wordnet_minilm recipe's data).

    apt-get install -y wordnet-base        # WordNet 3.0: /usr/share/wordnet/data.{noun,verb,adj,adv}
    python -m trainer.data.wordnet --out data/wordnet --train 4000 --test 1000

writes `OUT/train.jsonl` and `OUT/test.jsonl` (`{"anchor": gloss, "positive": lemma}`, one line per synset) and
pair shards `OUT/train`, `OUT/test` from them. A synset is held out or not as a whole (chosen by a seeded hash of
its offset and part of speech), so no test gloss or its lemma is seen in training. The gloss is the definition
without its quoted usage examples, which would often contain the lemma itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import DataError, UserError

WORDNET_DIR = Path("/usr/share/wordnet")
PARTS = ("noun", "verb", "adj", "adv")
_EXAMPLE = re.compile(r'"[^"]*"')


@dataclass(frozen=True)
class Synset:
    """One synset of a data.* file: its id, lemmas (spaces for underscores) and definition."""

    key: str
    lemmas: tuple[str, ...]
    gloss: str


def parse_line(line: str, part: str) -> Synset | None:
    """A data.* line → Synset (None for the licence header and malformed lines).

    Format: `offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id...] p_cnt ... | gloss`."""
    if line.startswith("  ") or "|" not in line:
        return None
    fields, _, gloss = line.partition("|")
    parts = fields.split()
    try:
        count = int(parts[3], 16)
        words = [parts[4 + 2 * i] for i in range(count)]
    except (IndexError, ValueError):
        return None
    lemmas = tuple(re.sub(r"\(\w+\)$", "", word).replace("_", " ") for word in words)  # adj markers: (a), (p)
    definition = _EXAMPLE.sub("", gloss).strip().strip(";").strip()
    if not definition or not lemmas:
        return None
    return Synset(f"{part}:{parts[0]}", lemmas, definition)


def read_synsets(root: Path = WORDNET_DIR) -> Iterator[Synset]:
    """Every synset of the four data files under `root`."""
    for part in PARTS:
        path = root / f"data.{part}"
        if not path.is_file():
            raise DataError(f"{path}: not found; install WordNet with `apt-get install -y wordnet-base` or pass --root")
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                synset = parse_line(line, part)
                if synset is not None:
                    yield synset


def _rank(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


def split_synsets(synsets: list[Synset], train: int, test: int, seed: int) -> tuple[list[Synset], list[Synset]]:
    """`test` then `train` synsets in a seeded order of their keys (disjoint: a synset is in one split only)."""
    if train + test > len(synsets):
        raise DataError(f"--train {train} + --test {test} exceed the {len(synsets)} synsets available")
    ordered = sorted(synsets, key=lambda synset: _rank(synset.key, seed))
    return ordered[test : test + train], ordered[:test]


def write_pairs(synsets: list[Synset], path: Path) -> None:
    """One `{"anchor": gloss, "positive": first lemma}` line per synset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for synset in synsets:
            handle.write(json.dumps({"anchor": synset.gloss, "positive": synset.lemmas[0]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.data.wordnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output directory (train/, test/, *.jsonl)")
    parser.add_argument("--train", type=int, default=4000, help="training synsets")
    parser.add_argument("--test", type=int, default=1000, help="held-out synsets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=WORDNET_DIR, help="directory holding data.noun etc.")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    from trainer.data.writer import write_shards

    try:
        train, test = split_synsets(list(read_synsets(args.root)), args.train, args.test, args.seed)
        for name, synsets in (("train", train), ("test", test)):
            write_pairs(synsets, args.out / f"{name}.jsonl")
            write_shards(str(args.out / f"{name}.jsonl"), "pairs", args.out / name,
                         samples_per_shard=args.samples_per_shard, overwrite=args.overwrite)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"wrote {len(train)} training and {len(test)} held-out gloss→lemma pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
