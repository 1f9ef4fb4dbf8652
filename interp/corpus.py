"""The reference corpus of the evidence stage: the text whose base-model activations give each direction's
max / min windows.

Directions are read on generic text (the CAFT paper used a web-text sample), not on the fine-tuning data: on
an insecure-code fine-tune every window would otherwise be code. So `evidence.corpus` is, in order:

- a JSONL path (`{"text": ...}` or chat rows): that file;
- `builtin:generic-v1`: a small generic corpus shipped with caft (`caft.prompts/data/generic_corpus.txt`,
  written for caft from templates), the default for causal LMs;
- `diff-inputs`: the diff stage's inputs (usually the training data), the default for encoders, whose
  generic text would not carry the task's label cues.

Every dossier's provenance names the corpus it came from (`corpus_source`, with a sha256 of its text).
"""

from __future__ import annotations

import hashlib
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from caft.errors import DataError
from caft.interp.config import EvidenceConfig
from caft.interp.inputs import INPUTS_FILE, Example, check_rows, load_examples, read_examples
from caft.interp.source import ActivationSource
from caft.jsonl import SKIPPED_FILE, ReadReport

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_GENERIC = "builtin:generic-v1"
DIFF_INPUTS = "diff-inputs"
_BUILTIN_FILES = {BUILTIN_GENERIC: "generic_corpus.txt"}


def builtin_text(name: str) -> str:
    """The text of a built-in corpus (one document per line, `#` lines are comments)."""
    if name not in _BUILTIN_FILES:
        raise DataError(
            f"evidence.corpus: unknown built-in corpus {name!r}; the built-in ones are {sorted(_BUILTIN_FILES)}"
        )
    return resources.files("caft.prompts").joinpath("data", _BUILTIN_FILES[name]).read_text("utf-8")


def builtin_documents(name: str) -> list[str]:
    return [
        line.strip() for line in builtin_text(name).splitlines() if line.strip() and not line.startswith("#")
    ]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_corpus(source: ActivationSource) -> str:
    return BUILTIN_GENERIC if source.is_causal_lm else DIFF_INPUTS


def check_corpus(cfg: EvidenceConfig) -> None:
    """What can be checked before a model loads: a corpus file exists and its rows decode and parse."""
    choice = cfg.corpus
    if choice is None or choice == DIFF_INPUTS:
        return
    if choice.startswith(BUILTIN_PREFIX):
        builtin_text(choice)
        return
    if not Path(choice).is_file():
        raise DataError(
            f"evidence.corpus: {choice} does not exist; give a JSONL of text (or chat) rows, "
            f"{BUILTIN_GENERIC!r} or {DIFF_INPUTS!r}"
        )
    check_rows(choice, skip_invalid=cfg.skip_invalid)


def reference_corpus(
    cfg: EvidenceConfig, source: ActivationSource, diff_dir: Path | None, stage_dir: Path | None = None
) -> tuple[list[Example], dict[str, Any]]:
    """The corpus examples (doc ids kept) and their provenance: `corpus` (display name), `corpus_source`
    (a resolved path, `builtin:NAME` or `diff-inputs:PATH`), `corpus_sha256` and `corpus_is_training_data`.
    Rows skipped under `skip_invalid` are counted (`corpus_skipped_rows`) and listed in
    `stage_dir/skipped.jsonl`."""
    choice = cfg.corpus or default_corpus(source)
    tok = source.tokenizer
    if choice.startswith(BUILTIN_PREFIX):
        docs = builtin_documents(choice)[: cfg.max_corpus_docs]
        raw = []
        for i, text in enumerate(docs):
            ids = list(tok(text, add_special_tokens=True)["input_ids"])[: cfg.max_length]
            raw.append(Example(f"{choice}:{i}", ids, [True] * len(ids)))
        digest = hashlib.sha256(builtin_text(choice).encode("utf-8")).hexdigest()
        info: dict[str, Any] = {
            "corpus": cfg.corpus_name or choice,
            "corpus_source": choice,
            "corpus_sha256": digest,
            "corpus_is_training_data": False,
        }
    elif choice == DIFF_INPUTS:
        inputs = diff_dir / INPUTS_FILE if diff_dir is not None else None
        if inputs is None or not inputs.is_file():
            raise DataError(
                "no reference corpus: evidence.corpus is `diff-inputs` but the diff stage has not written its "
                f"inputs; run the diff stage first, or set evidence.corpus to a JSONL of text rows or "
                f"{BUILTIN_GENERIC!r}"
            )
        raw = [
            Example(e.doc, e.input_ids[: cfg.max_length], [True] * min(len(e.input_ids), cfg.max_length))
            for e in load_examples(inputs)[: cfg.max_corpus_docs]
        ]
        info = {
            "corpus": cfg.corpus_name or DIFF_INPUTS,
            "corpus_source": f"{DIFF_INPUTS}:{inputs.resolve()}",
            "corpus_sha256": _sha256_file(inputs),
            "corpus_is_training_data": True,
        }
        log.warning(
            "evidence: the max/min windows come from the diff stage's inputs (usually the fine-tuning data), "
            "not from generic text; set evidence.corpus to read directions on generic text"
        )
    else:
        path = Path(choice)
        if not path.is_file():
            raise DataError(
                f"evidence.corpus: {choice} does not exist; give a JSONL of text (or chat) rows, "
                f"{BUILTIN_GENERIC!r} or {DIFF_INPUTS!r}"
            )
        rep = ReadReport()
        raw = read_examples(
            path,
            tok,
            prefix="corpus",
            causal=source.is_causal_lm,
            tokens="all",
            max_length=cfg.max_length,
            max_examples=cfg.max_corpus_docs,
            template=source.base.config.chat.template,
            skip_invalid=cfg.skip_invalid,
            report=rep,
        )
        info = {
            "corpus": cfg.corpus_name or path.name,
            "corpus_source": str(path.resolve()),
            "corpus_sha256": _sha256_file(path),
            "corpus_is_training_data": False,
        }
        if rep.skipped:
            info["corpus_skipped_rows"] = len(rep.skipped)
        if stage_dir is not None:
            (stage_dir / SKIPPED_FILE).unlink(missing_ok=True)
            rep.write_skipped(stage_dir / SKIPPED_FILE)
    if not raw:
        raise DataError(f"the reference corpus {info['corpus']!r} is empty (no rows with tokens)")
    return raw, info
