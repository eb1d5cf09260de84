"""The WordNet gloss → lemma converter on a small data file in WordNet's format (no installed WordNet needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data.formats import read_index
from trainer.data.wordnet import PARTS, main, parse_line, read_synsets, split_synsets
from trainer.errors import DataError

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
LINES = {
    "noun": ['02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the genus Canis; '
             '"the dog barked all night"  \n',
             '02121620 05 n 02 cat 0 true_cat 0 000 | feline mammal usually having thick soft fur  \n'],
    "verb": ['01168468 34 v 01 eat 0 000 | take in solid food; "She was eating a banana"  \n'],
    "adj": ['00001740 00 a 01 able(a) 0 000 | (usually followed by `to\') having the necessary means; '
            '"able to swim"\n'],
    "adv": ['00001740 02 r 01 barely 0 000 | only just  \n'],
}


def write_wordnet(root: Path, extra: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        lines = [HEADER, *LINES[part]]
        if part == "noun":
            lines += [f"{10000000 + i} 05 n 01 thing_{i} 0 000 | thing number {i}  \n" for i in range(extra)]
        (root / f"data.{part}").write_text("".join(lines))
    return root


def test_lines_become_definition_and_lemmas_without_examples_or_markers() -> None:
    dog = parse_line(LINES["noun"][0], "noun")
    assert dog is not None and dog.key == "noun:02084071"
    assert dog.lemmas == ("dog", "domestic dog", "Canis familiaris") and dog.gloss == "a member of the genus Canis"
    able = parse_line(LINES["adj"][0], "adj")
    assert able is not None and able.lemmas == ("able",) and "swim" not in able.gloss
    assert parse_line(HEADER, "noun") is None


def test_splits_are_disjoint_by_synset_and_written_as_pair_shards(tmp_path: Path) -> None:
    root = write_wordnet(tmp_path / "wn", extra=40)
    synsets = list(read_synsets(root))
    assert len(synsets) == 45
    train, test = split_synsets(synsets, 30, 10, seed=0)
    assert len(train) == 30 and len(test) == 10 and not {s.key for s in train} & {s.key for s in test}
    assert split_synsets(synsets, 30, 10, seed=0) == (train, test)
    assert main(["--out", str(tmp_path / "out"), "--root", str(root), "--train", "30", "--test", "10"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    assert [row["anchor"] for row in rows] == [s.gloss for s in test]
    index = read_index(tmp_path / "out" / "train")
    assert index.kind == "pairs" and index.num_samples == 30
    with pytest.raises(DataError, match="exceed the 45 synsets"):
        split_synsets(synsets, 40, 10, seed=0)
    assert main(["--out", str(tmp_path / "x"), "--root", str(tmp_path / "none")]) == 2
