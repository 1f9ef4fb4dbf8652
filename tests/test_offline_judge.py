"""The offline embedding judge: peak words, concept terms, ranking a planted concept above random
directions, verdict records, calibration, resume."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from caft.agent.config import OfflineJudgeConfig
from caft.agent.embedder import TextEmbedder
from caft.agent.offline import (
    JUDGE_ID,
    OfflineJudge,
    concept_terms,
    judge_offline,
    peak_word,
    rank_candidates,
)
from caft.agent.schema import TaskDescription, VerdictRecord
from caft.app.spurious import FOOD, NEGATIVE, POSITIVE, SPECS, SPORTS
from caft.errors import ConfigError
from caft.interp.schema import Candidate, Dossier, Window
from caft.rundir import read_jsonl

TASK = SPECS["sentiment-topic"].task
FILLER = [
    "the",
    "was",
    "a",
    "it",
    "on",
    "at",
    "report",
    "meeting",
    "window",
    "street",
    "letter",
    "bus",
    "office",
    "river",
    "ticket",
    "pen",
    "car",
]


@pytest.fixture(scope="module")
def embedder(minilm_dir: Path) -> TextEmbedder:
    return TextEmbedder(minilm_dir)


@pytest.fixture(scope="module")
def judge(embedder: TextEmbedder) -> OfflineJudge:
    return OfflineJudge(TASK, embedder=embedder)


def _win(sign: str, rank: int, sentence: list[str], peak: int) -> Window:
    n = len(sentence)
    return Window(
        id=f"ex:{sign}:{rank}",
        sign="max" if sign == "max" else "min",
        doc=f"d{rank}",
        tokens=sentence,
        values=[1.0 if i == peak else 0.1 for i in range(n)],
        scaled=[10 if i == peak else 1 for i in range(n)],
        peak=peak,
        value=1.0,
    )


def _dossier(cid: str, layer: int, max_words: list[str], min_words: list[str]) -> Dossier:
    def windows(sign: str, words: list[str]) -> list[Window]:
        return [_win(sign, i, ["i", "liked", "the", w, "."], 3) for i, w in enumerate(words)]

    kind = "pc" if cid.startswith("pc") else "vector"
    cand = Candidate(id=cid, kind=kind, layer=layer, index=int(cid.rsplit(":", 1)[-1]))
    return Dossier(
        candidate=cand, max_examples=windows("max", max_words), min_examples=windows("min", min_words)
    )


def _synthetic(seed: int = 0) -> tuple[list[Dossier], list[Dossier]]:
    """Per layer: one planted topic direction (food at one end, sports at the other), one sentiment
    direction (intended), one shortcut direction mixing both, and directions whose peaks are drawn from the
    whole vocabulary of the corpus (what a random direction looks like); null dossiers are random too."""
    rng = random.Random(seed)
    vocab = SPORTS + FOOD + POSITIVE + NEGATIVE + FILLER * 3

    def rand_words() -> list[str]:
        return [rng.choice(vocab) for _ in range(10)]

    cands: list[Dossier] = []
    nulls: list[Dossier] = []
    for layer in range(2):
        cands.append(_dossier(f"pc:L{layer}:0", layer, rng.sample(FOOD, 10), rng.sample(SPORTS, 10)))
        cands.append(_dossier(f"pc:L{layer}:1", layer, rng.sample(POSITIVE, 10), rng.sample(NEGATIVE, 10)))
        cands.append(_dossier(f"pc:L{layer}:2", layer, rng.sample(SPORTS, 10), rng.sample(NEGATIVE, 10)))
        for i in range(3, 8):
            cands.append(_dossier(f"pc:L{layer}:{i}", layer, rand_words(), rand_words()))
        for i in range(8):
            nulls.append(_dossier(f"vec:L{layer}:{i}", layer, rand_words(), rand_words()))
    return cands, nulls


def test_peak_word_joins_wordpieces_and_bpe_pieces() -> None:
    w = Window(id="ex:max:0", sign="max", doc="d", tokens=["the", "bur", "##ri", "##to", "."], values=[0] * 5,
               scaled=[0] * 5, peak=2, value=1.0)  # fmt: skip
    assert peak_word(w) == "burrito"
    w2 = w.model_copy(update={"tokens": ["Ġthe", "Ġbur", "rito", "."], "peak": 2})
    assert peak_word(w2) == "burrito"
    w3 = w.model_copy(update={"tokens": ["▁I", "▁love", "▁pas", "ta"], "peak": 3})
    assert peak_word(w3) == "pasta"


def test_concept_terms_keep_descriptions_and_content_words() -> None:
    terms = concept_terms(["topic words such as games, athletes and meals"])
    assert terms[0] == "topic words such as games, athletes and meals"
    assert {"games", "athletes", "meals"} <= set(terms)
    assert "such" not in terms and "and" not in terms


def test_stopwords_come_from_the_bundled_data_file() -> None:
    from caft.agent.offline import stopwords

    words = stopwords()
    assert {"the", "versus", "e.g.", "reads"} <= words and len(words) > 100
    assert not any(w.startswith("#") for w in words)  # the file's comment lines are not words


def test_planted_concept_ranks_above_random_directions(judge: OfflineJudge) -> None:
    cands, nulls = _synthetic()
    ranking = rank_candidates(cands, TASK, nulls, judge=judge)
    order = [cid for cid, _ in ranking]
    planted = {"pc:L0:0", "pc:L1:0"}
    assert set(order[:2]) == planted, ranking
    zs = dict(ranking)
    for cid in zs:
        if cid.endswith((":1", ":2")):  # the intended and the mixed directions are not undesired
            assert zs[cid] < min(zs[p] for p in planted)
    assert min(zs[p] for p in planted) > 2.0


def test_verdicts_have_relation_label_and_cited_evidence(judge: OfflineJudge) -> None:
    cands, nulls = _synthetic()
    recs = {r.candidate: r for r in judge.judge(cands, nulls)}
    planted = recs["pc:L0:0"]
    assert planted.judge == JUDGE_ID and planted.method == JUDGE_ID
    assert planted.verdict is not None
    assert planted.verdict.relation == "undesired"
    assert planted.verdict.confidence > 0.5
    by_id = {d.candidate.id: d for d in cands}
    assert set(planted.verdict.evidence) <= by_id["pc:L0:0"].evidence_ids()
    assert planted.verdict.evidence
    assert any(w in planted.verdict.description for w in FOOD)
    sentiment = recs["pc:L0:1"]
    assert sentiment.verdict is not None and sentiment.verdict.relation == "intended"
    assert planted.scores["z"] > sentiment.scores["z"]
    assert 0.0 <= (planted.relevance or 0.0) <= 100.0


def test_calibration_without_nulls_uses_candidates_and_random_mode_needs_nulls(
    embedder: TextEmbedder,
) -> None:
    cands, _ = _synthetic(1)
    j = OfflineJudge(TASK, OfflineJudgeConfig(calibration="candidates"), embedder=embedder)
    ranking = rank_candidates(cands, TASK, judge=j)
    assert ranking[0][0] in {"pc:L0:0", "pc:L1:0"}
    j2 = OfflineJudge(TASK, OfflineJudgeConfig(calibration="random"), embedder=embedder)
    with pytest.raises(ConfigError, match="null_dossiers"):
        j2.score_all(cands)


def test_task_without_undesired_concepts_is_refused(embedder: TextEmbedder) -> None:
    task = TaskDescription(name="open", intended="write code", open_setting=True)
    with pytest.raises(ConfigError, match="undesired"):
        OfflineJudge(task, embedder=embedder)


def test_judge_offline_writes_verdicts_and_resumes(tmp_path: Path, judge: OfflineJudge) -> None:
    cands, nulls = _synthetic()
    recs = judge_offline(cands[:5], TASK, tmp_path, nulls, judge=judge)
    rows = read_jsonl(tmp_path / "verdicts.jsonl")
    assert [r["candidate"] for r in rows] == [d.candidate.id for d in cands[:5]]
    assert all(VerdictRecord.model_validate(r).verdict is not None for r in rows)
    # rerun over all candidates: the first five keep their lines, the rest are appended
    again = judge_offline(cands, TASK, tmp_path, nulls, judge=judge)
    rows = read_jsonl(tmp_path / "verdicts.jsonl")
    assert len(rows) == len(cands)
    assert [r.candidate for r in again] == [d.candidate.id for d in cands]
    assert again[0].scores == recs[0].scores


class _AxisEmbedder:
    """Embeds the task's undesired terms on axis 0, its intended terms on axis 1, and the test's peak words
    wherever the test puts them, so each word's margin (undesired minus intended similarity) is exact."""

    def __init__(self, words: dict[str, tuple[float, float, float]]) -> None:
        from caft.agent.offline import task_terms

        undesired, intended = task_terms(TASK)
        self.vectors = dict.fromkeys(undesired, (1.0, 0.0, 0.0)) | dict.fromkeys(intended, (0.0, 1.0, 0.0))
        self.vectors |= words

    def embed(self, texts: list[str]) -> Any:
        import torch

        return torch.tensor([self.vectors[t] for t in texts]).reshape(len(texts), 3)


def test_an_end_about_the_intended_concept_vetoes_the_direction() -> None:
    """A shortcut direction (a strong undesired end, the other end about the intended concept) must rank
    below a plain topic direction with a weaker undesired end: ablating the shortcut would remove the
    intended signal. With the intended end weighted like any other end (no veto) the order flips."""
    words = {
        "goal": (1.0, 0.0, 0.0),
        "joy": (0.0, 0.4, 0.0),
        "meal": (0.5, 0.0, 0.0),
        "desk": (0.0, 0.0, 1.0),
    }
    words |= {"pen": (0.1, 0.0, 0.0), "cup": (0.05, 0.0, 0.0)}
    judge = OfflineJudge(TASK, OfflineJudgeConfig(min_null=2), embedder=_AxisEmbedder(words))
    shortcut = _dossier("pc:L0:0", 0, ["goal"] * 4, ["joy"] * 4)  # margins +1.0 / -0.4
    topic = _dossier("pc:L0:1", 0, ["meal"] * 4, ["desk"] * 4)  # margins +0.5 / 0.0
    nulls = [_dossier(f"vec:L0:{i}", 0, [w] * 4, ["desk"] * 4) for i, w in enumerate(["pen", "cup", "desk"])]
    s_short, s_topic = judge.score(shortcut), judge.score(topic)
    assert s_short.raw == pytest.approx(1.0 - 2.0 * 0.4) and s_topic.raw == pytest.approx(0.5)
    assert s_short.raw < s_topic.raw
    recs = {r.candidate: r for r in judge.judge([shortcut, topic], nulls)}
    assert recs["pc:L0:1"].scores["z"] > recs["pc:L0:0"].scores["z"]
    assert rank_candidates([shortcut, topic], TASK, nulls, judge=judge)[0][0] == "pc:L0:1"
