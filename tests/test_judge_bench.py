"""The judge benchmark: ground truth from correlations on a balanced corpus, a judge scored blind against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from caft.agent.bench import (
    BenchConfig,
    _assert_label_free,
    auroc,
    replay_provider,
    run_bench,
    run_directions,
    split_random,
    undesired_score,
)
from caft.agent.bench_truth import balanced, correlations, labelled_rows
from caft.agent.config import SelectionPolicy, TriageConfig
from caft.agent.fixtures import concept_of_text, make_dossier, verdict_for
from caft.agent.schema import JudgeVerdict, VerdictRecord
from caft.config import ModelConfig
from caft.errors import DataError
from caft.interp.schema import (
    Candidate,
    dossier_filename,
    save_candidates,
    write_random_candidates,
)
from caft.llm import GenerateConfig, Message, MockProvider


def test_auroc_counts_ties_half_and_needs_both_classes() -> None:
    assert auroc([0.9, 0.8, 0.1, 0.0], [True, True, False, False]) == 1.0
    assert auroc([0.0, 0.9], [True, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5
    assert auroc([0.5, 0.4], [True, True]) is None


def _llm_record(relation: str, confidence: float) -> VerdictRecord:
    verdict = JudgeVerdict(
        label="x",
        description="x",
        relation=relation,
        confidence=confidence,
        evidence=["ex:max:0"],
        rationale="x",
    )
    return VerdictRecord(candidate="pc:L0:0", judge="mock/replay", verdict=verdict)


def test_llm_undesired_score_is_signed_so_intended_ranks_below_unrelated() -> None:
    policy = SelectionPolicy()
    score = {
        rel: undesired_score([_llm_record(rel, 0.8)], policy)
        for rel in ("undesired", "unrelated", "unclear", "intended")
    }
    assert score == {"undesired": 0.8, "unrelated": 0.0, "unclear": 0.0, "intended": -0.8}
    # the mean over an ensemble's records; the offline judge's z wins when present; no verdict scores 0
    assert undesired_score(
        [_llm_record("undesired", 0.9), _llm_record("intended", 0.5)], policy
    ) == pytest.approx(0.2)
    z = VerdictRecord(candidate="pc:L0:0", judge="offline-embedding", verdict=None, scores={"z": 2.5})
    assert undesired_score([z], policy) == 2.5
    assert (
        undesired_score([VerdictRecord(candidate="c", judge="j", unscored="parse_failure: x")], policy) == 0.0
    )


def test_balanced_makes_label_and_cue_independent() -> None:
    rows = [{"text": f"t{i}", "label": i % 2, "cue": i % 2} for i in range(30)]  # correlated
    rows += [{"text": f"o{i}", "label": i % 2, "cue": 1 - i % 2} for i in range(10)]  # inverted
    out = balanced(rows, seed=0)
    cells = [(r["label"], r["cue"]) for r in out]
    assert len(out) == 20 and all(cells.count(c) == 5 for c in {(0, 0), (0, 1), (1, 0), (1, 1)})
    with pytest.raises(DataError, match="cells"):
        balanced(rows[:30], seed=0)


def test_split_random_keeps_half_for_calibration_per_layer() -> None:
    rand = [make_dossier(f"vec:L{L}:null{i}", L, "weather", index=i) for L in (0, 1) for i in range(8)]
    held, calib = split_random(rand, per_layer=10, seed=0)
    assert len(held) == len(calib) == 8
    assert sorted(d.candidate.layer for d in held) == [0] * 4 + [1] * 4
    assert not {d.candidate.id for d in held} & {d.candidate.id for d in calib}


def _dataset(root: Path) -> Path:
    from caft.app.spurious import write_spurious

    data = root / "data"
    write_spurious("sentiment-topic", data, seed=0, sizes={"train": 40, "val": 40, "ood": 40, "corpus": 20})
    return data


def _run(root: Path, model: Path) -> Path:
    """A run folder as the pipeline leaves it: diff candidates + evidence, random controls + their evidence."""
    import torch

    run = root / "run"
    cands = [
        make_dossier(f"pc:L{L}:{i}", L, "evil" if i == 0 else "code", index=i)
        for L in (0, 1)
        for i in range(3)
    ]
    gen = torch.Generator().manual_seed(0)
    dirs = {d.candidate.id: torch.randn(32, generator=gen) for d in cands}
    save_candidates(run / "diff", [d.candidate for d in cands], dirs)
    (run / "evidence" / "dossiers").mkdir(parents=True)
    for d in cands:
        (run / "evidence" / "dossiers" / dossier_filename(d.candidate.id)).write_text(d.model_dump_json())
    ctl = write_random_candidates(run / "triage" / "controls", 32, [0, 1], 6, seed=0)
    (ctl / "evidence" / "dossiers").mkdir(parents=True)
    for L in (0, 1):
        for i in range(6):
            d = make_dossier(f"vec:L{L}:null{i}", L, "weather", index=i)
            d = d.model_copy(
                update={
                    "candidate": Candidate(
                        id=d.candidate.id, kind="vector", layer=L, index=i, source="random"
                    )
                }
            )
            (ctl / "evidence" / "dossiers" / dossier_filename(d.candidate.id)).write_text(d.model_dump_json())
    manifest = {"config": {"model": {"name_or_path": str(model), "kind": "encoder", "device": "cpu"}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def _judge(messages: list[Message], config: GenerateConfig) -> Any:
    concept = concept_of_text(messages[-1].content)  # evil -> undesired 0.9, weather / code -> other
    return verdict_for(concept, evidence=["ex:max:0"]).model_dump()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from caft.testing import save_tiny

    return save_tiny(tmp_path_factory.mktemp("enc") / "bert", arch="bert", template=None, hidden=32, layers=2)


def test_bench_scores_a_judge_against_correlations(tmp_path: Path, tiny_encoder: Path) -> None:
    data, run = _dataset(tmp_path), _run(tmp_path, tiny_encoder)
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "results.json").write_text(json.dumps({"caft": {"val": 1.0, "ood": 0.9}, "k": 2}))
    cfg = BenchConfig(
        data=str(data),
        run=str(run),
        out=str(tmp_path / "bench"),
        heldout_per_layer=2,
        triage=TriageConfig(
            task=str(data / "task.yaml"),
            judge={"model": "mock/j"},
            selection=SelectionPolicy(threshold=0.5, max_per_layer=None, max_total=None),
        ),
        results=str(tmp_path / "seed"),
        r_cue=0.05,  # a random tiny encoder: small correlations, so that some directions count as undesired
        r_intended=0.9,
    )
    provider = MockProvider("j", _judge)
    report = run_bench(cfg, provider=provider)
    # judged blind: the 6 candidates and 2 held-out random directions per layer; 8 controls calibrate
    users = [m[-1].content for m, _ in provider.calls]
    assert len(users) == 6 + 4 + 8 and not any("pc:" in u or "null" in u or "kind" in u for u in users)
    rows = [json.loads(x) for x in (tmp_path / "bench" / "directions.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and sum(r["random"] for r in rows) == 4
    assert all(-1 <= r["r_cue"] <= 1 and -1 <= r["r_intended"] <= 1 for r in rows)
    cand = [r for r in rows if not r["random"]]
    truth = {r["id"] for r in cand if abs(r["r_cue"]) >= 0.05 and abs(r["r_intended"]) < 0.9}
    assert (
        report["truly_undesired"] == len(truth) and {r["id"] for r in cand if r["truly_undesired"]} == truth
    )
    # the judge flags the two evil dossiers (score 0.9) and no random direction
    assert {r["id"] for r in rows if r["selected"]} == {"pc:L0:0", "pc:L1:0"}
    assert report["random_heldout"]["fpr_selected"] == 0.0 and report["random_heldout"]["n"] == 4
    assert report["auroc"] == auroc([r["score"] for r in cand], [r["truly_undesired"] for r in cand])
    sel = report["selected"]
    assert sel["n"] == 2 and sel["hits"] == len(truth & {"pc:L0:0", "pc:L1:0"})
    assert report["calibration"]["controls"] == 8 and report["downstream"] == {
        "caft": {"val": 1.0, "ood": 0.9}
    }
    assert "|r_cue| >= 0.05" in report["ground_truth"]["truly_undesired"]
    table = (tmp_path / "bench" / "bench.md").read_text()
    assert (
        "| judge: selected (after the per-layer limits) | 2 |" in table
        and "| caft | 100.0% | 90.0% |" in table
    )
    # the recorded replies replay through the mock provider: the same verdicts, no live judge
    replay = replay_provider(tmp_path / "bench" / "triage" / "exchanges.jsonl")
    again = run_bench(cfg.model_copy(update={"out": str(tmp_path / "again")}), provider=replay)
    assert again["selected"] == report["selected"] and again["auroc"] == report["auroc"]


def test_correlations_use_the_layer_output_mean_pooled(tmp_path: Path, tiny_encoder: Path) -> None:
    """r from the bench equals r recomputed from transformers' hidden_states[layer + 1], mean-pooled."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    data = _dataset(tmp_path)
    rows = balanced(labelled_rows(data), seed=0)
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    model = ModelConfig(name_or_path=str(tiny_encoder), kind="encoder", device="cpu")
    got = correlations(model, rows, {"x": v}, {"x": 1}, tmp_path)["x"]
    tok = AutoTokenizer.from_pretrained(str(tiny_encoder))
    enc = AutoModel.from_pretrained(str(tiny_encoder)).eval()
    proj = []
    with torch.no_grad():
        for r in rows:
            b = tok(r["text"], return_tensors="pt", truncation=True, max_length=256)
            h = enc(**b, output_hidden_states=True).hidden_states[2][0]  # layer 1's output, (T, d)
            proj.append(float(h.mean(0) @ (v / v.norm())))
    want = float(np.corrcoef(proj, [r["cue"] for r in rows])[0, 1])
    assert got["r_cue"] == pytest.approx(want, abs=2e-3)


def test_the_judge_inputs_must_not_carry_labels(tmp_path: Path) -> None:
    d = make_dossier("pc:L0:0", 0, "evil")
    folder = tmp_path / "in" / "dossiers"
    folder.mkdir(parents=True)
    (folder / "a.json").write_text(d.model_dump_json())
    _assert_label_free(tmp_path / "in")
    # concept names as keys (a contrast section's figures per concept) are not labels
    named = d.model_copy(update={"provenance": {"contrast": {"cue": 0.4, "label": "topic"}}})
    (folder / "c.json").write_text(named.model_dump_json())
    _assert_label_free(tmp_path / "in")
    leaky = d.model_copy(update={"provenance": {"rows": [{"text": "x", "cue": 1}]}})
    (folder / "b.json").write_text(leaky.model_dump_json())
    with pytest.raises(AssertionError, match="a labelled row"):
        _assert_label_free(tmp_path / "in")


def test_run_directions_include_the_contrast_basis(tmp_path: Path) -> None:
    import torch

    from caft.interp.contrast import CONTRAST_DIR

    run = tmp_path / "run"
    write_random_candidates(run / "diff", 8, [1], 2, seed=0)
    ct = Candidate(id="vec:L1:ct-topic-0", kind="vector", layer=1, index=0, source="contrast")
    save_candidates(run / "evidence" / CONTRAST_DIR, [ct], {ct.id: torch.ones(8) / 8**0.5})
    dirs = run_directions(run)
    assert "vec:L1:ct-topic-0" in dirs and {"vec:L1:null0", "vec:L1:null1"} <= dirs.keys()
