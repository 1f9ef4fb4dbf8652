"""F6: the evidence corpus of a causal LM is generic text by default, not the fine-tuning data, and every
dossier names the corpus it came from."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from interp_helpers import chat_rows, make_pair, write_jsonl

from caft.app.preflight import preflight
from caft.app.run_config import RunConfig
from caft.errors import DataError
from caft.interp.config import DiffConfig, EvidenceConfig, InputsConfig, SteeringConfig
from caft.interp.corpus import BUILTIN_GENERIC, builtin_documents
from caft.interp.evidence import build_dossiers
from caft.interp.pca import run_diff
from caft.interp.schema import load_dossiers


def _evidence(**kw: object) -> EvidenceConfig:
    return EvidenceConfig.model_validate(
        {
            "top_k": 3,
            "diff_summary": False,
            "logit_lens": False,
            "steering": SteeringConfig(enabled=False),
            **kw,
        }
    )


def test_builtin_corpus_is_generic_and_varied() -> None:
    docs = builtin_documents(BUILTIN_GENERIC)
    assert len(docs) >= 80 and len(set(docs)) == len(docs)
    sentences = {s for d in docs for s in d.split(". ")}
    assert len(sentences) >= 200
    assert not any("def " in d or "import " in d for d in docs)  # prose, not code


def test_dossiers_record_their_corpus(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(8))
    run = tmp_path / "run"
    run_diff(
        DiffConfig(inputs=InputsConfig(data=[str(data)]), layers=[1], n_components=2),
        run,
        model=base,
        finetuned=ft,
    )
    # no corpus given: the built-in generic corpus, never the training data
    d = load_dossiers(build_dossiers(_evidence(), run, model=base, finetuned=ft))[0]
    prov = d.provenance
    assert prov["corpus_source"] == BUILTIN_GENERIC and prov["corpus_is_training_data"] is False
    assert len(prov["corpus_sha256"]) == 64 and prov["corpus_docs"] == len(builtin_documents(BUILTIN_GENERIC))
    assert all(w.doc.startswith(BUILTIN_GENERIC + ":") for w in d.max_examples + d.min_examples)

    # the old behaviour, asked for explicitly, says that the windows are the training data's
    shutil.rmtree(run / "evidence")
    d = load_dossiers(build_dossiers(_evidence(corpus="diff-inputs"), run, model=base, finetuned=ft))[0]
    assert d.provenance["corpus_is_training_data"] is True
    assert d.provenance["corpus_source"] == f"diff-inputs:{(run / 'diff' / 'inputs.jsonl').resolve()}"

    # a file: its resolved path and the sha256 of its bytes
    corpus = write_jsonl(
        tmp_path / "c.jsonl", [{"text": f"Rivers run to the sea, line {i}."} for i in range(6)]
    )
    shutil.rmtree(run / "evidence")
    d = load_dossiers(build_dossiers(_evidence(corpus=str(corpus)), run, model=base, finetuned=ft))[0]
    assert d.provenance["corpus_source"] == str(corpus.resolve())
    assert d.provenance["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()

    shutil.rmtree(run / "evidence")
    with pytest.raises(DataError, match="unknown built-in corpus 'builtin:web'"):
        build_dossiers(_evidence(corpus="builtin:web"), run, model=base, finetuned=ft)


def test_preflight_checks_the_corpus_name(tmp_path: Path) -> None:
    def problems(corpus: str) -> list[str]:
        cfg = RunConfig.model_validate(
            {
                "model": {"name_or_path": "gpt2"},
                "evidence": {"corpus": corpus, "steering": {"coherence": "perplexity"}},
            }
        )
        return preflight(cfg, ["evidence"], network=False)

    assert any("unknown built-in corpus" in p for p in problems("builtin:nope"))
    assert problems(BUILTIN_GENERIC) == [] and problems("diff-inputs") == []
    assert any("does not exist" in p for p in problems(str(tmp_path / "missing.jsonl")))
