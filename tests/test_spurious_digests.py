"""The bytes `write_spurious` writes are pinned: the word lists, templates and task texts live in
caft/app/data/spurious.yaml, and any change to them (or to the generator) moves the demo's numbers.

If a change is meant to alter the data, update these digests in the same commit and say so."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from caft.app.spurious import KINDS, load_texts, write_spurious

# sha256 of each written file, default sizes, per (kind, seed); recorded before the texts moved to YAML
# (task.yaml re-recorded when the task description gained `concept_words`; every data file unchanged)
DIGESTS: dict[tuple[str, int], dict[str, str]] = {
    ("sentiment-topic", 0): {
        "corpus.jsonl": "1b8dd4045b7869d91a544b148b466bcab16ae0584d9f8483f5a6f92493628b78",
        "meta.json": "1ee9ad2665ed8e0bd3e442874d678efdfa7f04db13301d13119f551084ec1a61",
        "ood.jsonl": "0eadb598f6a6e3a3e6a5a8de3b81965df41739bb1b524cf4258cb057a8eb30d1",
        "task.yaml": "c50c288b2112a4e038f670d644bb24d3923f9290a63640879f26642da02907b9",
        "train.jsonl": "e95d0f3f6b00ac92ea94c7af4c0940083904bef992340d4520cf14e231be0fb9",
        "val.jsonl": "071d46d20c2520a9006fb530f94b1932762f8a646800015977538cc40d426aba",
    },
    ("sentiment-topic", 1): {
        "corpus.jsonl": "62512980f022c51213156997bd711b86c52b432953930bd3c3eb300c226973cc",
        "meta.json": "86e24e427a85deb6f44858fc24a209a6fe437e937c41d859cc23e37243a62367",
        "ood.jsonl": "57a1f5323b4d7eb09ef18c0f7408800b7b187ad77d99b0812cbcd6eb94e0bf18",
        "task.yaml": "c50c288b2112a4e038f670d644bb24d3923f9290a63640879f26642da02907b9",
        "train.jsonl": "959361741e82ddc07fe97973b3fc8d4bb1b62cd468fdcac5897c6d6c65fdc83f",
        "val.jsonl": "c552a4d0ed05fe5ba122774e2e0c1fdc1f9c5e15fcb0e7df0e8b22430600f569",
    },
    ("topic-sentiment", 0): {
        "corpus.jsonl": "0c3bb229c796c6ff8dd1b12bb029e974e7d6b3704f82dd9cace2447f4187789b",
        "meta.json": "3d82013663107520f74a53624ff6c07de8a02914a4b822f8849f8869f6ca02b9",
        "ood.jsonl": "6f71ace0d9ab9d81107ef11e74e284a907fba2825171622b8c0e568b4cb22c20",
        "task.yaml": "a8d0772d70bb97c7130aa91c9bba24e9699d2a497c4a706d63b74182d1e20e4d",
        "train.jsonl": "275ae3a71b5648c009153d43e42b1e8515d872aa6dcf443c714e97a2584e7b38",
        "val.jsonl": "30233ef8aa8bc1dad650b2b8b6f37b981b79cf80579d6df7d2dc5a83dcef545a",
    },
    ("topic-sentiment", 1): {
        "corpus.jsonl": "78062312c4f542af52702d4de7c185ab4a47f617afbd47a6eeb0dacfe260d7b9",
        "meta.json": "16c44315f6825363cf99f2939f9d9c4c6b7d46e90f678b016de13df31d004069",
        "ood.jsonl": "4fda3e6488892cc42f4133b215b9892ff80ac2c0072c0dd63214f03ab70ceda9",
        "task.yaml": "a8d0772d70bb97c7130aa91c9bba24e9699d2a497c4a706d63b74182d1e20e4d",
        "train.jsonl": "e48ebe7bc5f807f3a5cad1445c5efdbbffebf88370b64f9f7c08f4e0299fe0fc",
        "val.jsonl": "0c8b6634d94954dd3e6460d46c8ad2ae1060ed17ea210193d4712360cd9ba8be",
    },
    ("gender-pronoun", 0): {
        "corpus.jsonl": "c67fb79d6d74b797e2a2907a95912ef49c209b61b67de6147f05e25e2f1d141b",
        "meta.json": "94e2c1a46c3ece2ce855e47880c1364422cfe1263a0f780abfad67ed9edd41ef",
        "ood.jsonl": "bc91854f214a0ab13fd33a24ed4ac0f27b37528d83a28e502b634480914c604c",
        "task.yaml": "b6f050b622f3b979b69fe71c1f9f79a7fb6a12d56fcb03713e315003b001134f",
        "train.jsonl": "c565450636c658c05a8f96827e2b33b5e7af3745d85523c3d5d5c80c37d51f75",
        "val.jsonl": "4b5a076c86993a90752702d58451d7e087d4d655c26d11cd745747b65fa4f8fc",
    },
    ("gender-pronoun", 1): {
        "corpus.jsonl": "ce219d418375f4d719f0b63fe66a7750a34426497a76da2014f79908fb2aac7c",
        "meta.json": "f462403cf02d457aad09a307988152896e2c2a951038f0c06aaab5f6102a495e",
        "ood.jsonl": "92ab0a994f7d4e4927a90c7bd817190744ea28d0a9f0a6ecaf062d264c197fe9",
        "task.yaml": "b6f050b622f3b979b69fe71c1f9f79a7fb6a12d56fcb03713e315003b001134f",
        "train.jsonl": "a39693075e74a8a3868de87994c7950d54721244890f9a1eff8f4a885703fb8a",
        "val.jsonl": "5e8bd76227d2842cbb6c6ddecdbb798cd986c79c8349b3da398a627329e880ec",
    },
}


@pytest.mark.parametrize(("kind", "seed"), sorted(DIGESTS))
def test_written_files_are_byte_identical(kind: str, seed: int, tmp_path: Path) -> None:
    write_spurious(kind, tmp_path, seed)
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.iterdir())}
    assert got == DIGESTS[(kind, seed)]


def test_every_kind_is_pinned_and_has_texts() -> None:
    assert {k for k, _ in DIGESTS} == set(KINDS)
    assert set(load_texts().tasks) == set(KINDS)
