"""LLM judges read blind prompts and are calibrated on random controls, like the offline judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from caft.agent.config import CalibrationConfig, RenderLimits, SelectionPolicy, TriageConfig
from caft.agent.fixtures import concept_of_text, make_dossier, record, verdict_for, write_evidence
from caft.agent.judges import calibrate
from caft.agent.render import blind_aliases, render_dossier, render_overview_entry
from caft.agent.single import build_messages
from caft.agent.task import load_task
from caft.agent.triage import run_triage
from caft.interp.schema import dossier_filename
from caft.testing.fakellm import FakeLLM, RecordedRequest, Reply

TASK = load_task("emergent-misalignment")
# what a rendered prompt must not give away: ids, kinds, indices, rankings, variance scores, raw peak values
LEAKS = ("pc:", "vec:", "null", "kind ", "index ", "Rankings", "explained_variance", "#1", "peak ")


def test_blind_prompt_hides_kind_index_rank_and_id() -> None:
    d = make_dossier("pc:L3:7", 3, "evil", index=7)
    user = build_messages(d, TASK, TriageConfig())[1].content
    assert "Candidate direction at layer 3" in user
    for leak in LEAKS:
        assert leak not in user, leak
    control = make_dossier("vec:L3:null4", 3, "evil", index=4)
    # a control renders exactly like a candidate with the same evidence
    assert build_messages(control, TASK, TriageConfig())[1].content == user
    open_view = render_dossier(d, RenderLimits(), blind=False)
    assert "kind pc" in open_view and "index 7" in open_view and "Rankings" in open_view
    assert "kind pc" in build_messages(d, TASK, TriageConfig(blind=False))[1].content
    entry = render_overview_entry(d, 2, 6, blind=True)
    assert "kind" not in entry and "explained_variance" not in entry


def test_blind_aliases_are_opaque_seeded_and_one_to_one() -> None:
    ids = [f"pc:L1:{i}" for i in range(12)] + [f"vec:L1:null{i}" for i in range(12)]
    a = blind_aliases(ids, seed=0)
    assert a == blind_aliases(list(reversed(ids)), seed=0)
    assert len(set(a.values())) == len(ids) and all(v.startswith("d") for v in a.values())
    order = [a[i] for i in sorted(ids)]
    assert order != sorted(order)  # the listing order does not follow the ids
    assert blind_aliases(ids, seed=1) != a


def test_calibrate_sets_the_threshold_above_the_controls() -> None:
    recs = [record(f"vec:L1:null{i}", "evil", confidence=c) for i, c in enumerate([0.9, 0.8, 0.6, 0.4])]
    recs += [record(f"vec:L1:null{i}", "weather") for i in range(4, 20)]  # unrelated: score 0
    controls = {f"vec:L1:null{i}" for i in range(20)}
    policy, info = calibrate(recs, controls, SelectionPolicy(threshold=0.5), alpha=0.05)
    # 20 controls, alpha 0.05: at most one may reach the threshold -> just above the second highest (0.8)
    assert info["calibrated_threshold"] == pytest.approx(0.801) and policy.threshold == pytest.approx(0.801)
    assert info["control_fpr"] == pytest.approx(1 / 20) and info["scored"] == 20
    # the policy's own threshold is the floor
    policy, info = calibrate(recs, controls, SelectionPolicy(threshold=0.95), alpha=0.05)
    assert policy.threshold == 0.95 and info["threshold"] == 0.95
    # relevance scores calibrate the relevance threshold
    rel = [r.model_copy(update={"relevance": 5.0 * i}) for i, r in enumerate(recs)]  # 0, 5, ..., 95
    policy, info = calibrate(rel, controls, SelectionPolicy(score="relevance", relevance_threshold=50), 0.1)
    # alpha 0.1 of 20: two may reach it -> just above the third highest (85)
    assert policy.relevance_threshold == pytest.approx(85.1) and policy.threshold == 0.7


def _router(seen: list[str]) -> Any:
    """The fake judge: evil -> undesired 0.9, weather -> undesired 0.7 (a candidate the calibration decides),
    code -> undesired 0.3 (quiet controls), gender -> undesired 0.85 (controls that look undesired)."""
    conf = {"evil": 0.9, "weather": 0.7, "code": 0.3, "gender": 0.85}

    def reply(req: RecordedRequest) -> Reply:
        user = req.body["messages"][-1]["content"]
        seen.append(user)
        concept = concept_of_text(user)
        v = verdict_for("evil", evidence=["ex:max:0"], confidence=conf[concept])
        return Reply(json=v.model_dump())

    return reply


def _controls(root: Path, concepts: list[str]) -> Path:
    folder = root / "controls" / "evidence" / "dossiers"
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(concepts):
        d = make_dossier(f"vec:L1:null{i}", 1, c, index=i)
        (folder / dossier_filename(d.candidate.id)).write_text(d.model_dump_json())
    return folder.parent


@pytest.mark.parametrize(("loud", "expect_weather"), [(0, True), (3, False)])
def test_llm_judge_threshold_comes_from_its_scores_on_controls(
    tmp_path: Path, loud: int, expect_weather: bool
) -> None:
    """Through the real wire format: controls judged blind among the candidates; when several controls
    read as undesired 0.85 the threshold rises above 0.85 and the 0.7 candidate drops out."""
    cands = [make_dossier("pc:L1:0", 1, "evil"), make_dossier("pc:L1:1", 1, "weather", index=1)]
    ev = write_evidence(tmp_path, cands)
    controls = _controls(tmp_path, ["gender"] * loud + ["code"] * (10 - loud))
    seen: list[str] = []
    cfg = TriageConfig(
        task="emergent-misalignment",
        judge={"model": "openai-compatible/j", "max_concurrency": 2},
        selection=SelectionPolicy(threshold=0.5, max_per_layer=None, max_total=None),
        calibration=CalibrationConfig(alpha=0.1),
        controls_per_layer=10,
    )
    with FakeLLM() as fake:
        fake.on_request(_router(seen))
        judge = cfg.judge.model_copy(update={"base_url": fake.openai_base_url})
        cfg = cfg.model_copy(update={"judge": judge})
        res = run_triage(cfg, ev, controls_dir=controls)
    # identical control evidence renders to identical prompts (the response cache answers most repeats)
    assert len(set(seen)) == (4 if loud else 3)
    assert len((res.out_dir / "verdicts.jsonl").read_text().splitlines()) == 12
    for user in seen:
        for leak in LEAKS:
            assert leak not in user, leak
    picked = {c.candidate for c in res.selection.selected}
    assert picked == ({"pc:L1:0", "pc:L1:1"} if expect_weather else {"pc:L1:0"})
    cal = res.selection.calibration
    assert cal is not None and cal["alpha"] == 0.1 and cal["controls"] == 10
    assert cal["threshold"] == (0.5 if expect_weather else pytest.approx(0.851))
    assert cal["control_fpr"] <= 0.1
    saved = json.loads((res.out_dir / "selection.json").read_text())
    assert saved["calibration"]["threshold"] == cal["threshold"]
    assert res.summary["calibration"] == cal and res.summary["controls"]["undesired"] <= 1


def test_agent_session_is_blind_and_maps_ids_back(tmp_path: Path) -> None:
    """The agent's overview and tool results show opaque ids and layers only; a verdict recorded under an
    opaque id lands in verdicts.jsonl under the real candidate id, and a control mixed in stays a control."""
    import asyncio

    from caft.agent.loop import AgentSession
    from caft.llm import LLMClient, MockProvider

    ds = [make_dossier("pc:L1:0", 1, "evil"), make_dossier("vec:L1:null0", 1, "weather")]
    shown = blind_aliases([d.candidate.id for d in ds], seed=0)
    call = {
        "name": "record_verdict",
        "arguments": {"candidate": shown["pc:L1:0"], **verdict_for("evil").model_dump()},
    }
    script = [
        {
            "tool_calls": [
                {"id": "a", "name": "get_examples", "arguments": {"candidate": shown["vec:L1:null0"]}}
            ]
        },
        {"tool_calls": [{"id": "b", **call}]},
        {"tool_calls": [{"id": "c", "name": "finish", "arguments": {"selected": [shown["pc:L1:0"]]}}]},
    ]
    provider = MockProvider("agent", script)
    session = AgentSession(LLMClient(provider, max_retries=0), TASK, ds, TriageConfig(kind="agent"), tmp_path)
    overview = session.overview({})
    for leak in LEAKS:
        assert leak not in overview, leak
    assert shown["pc:L1:0"] in overview and "(layer 1)" in overview
    outcome = asyncio.run(session.run())
    assert outcome.finished and outcome.chosen == ["pc:L1:0"]
    recs = [json.loads(x) for x in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert [r["candidate"] for r in recs] == ["pc:L1:0"]
    tool_result = provider.calls[1][0][-1].content
    assert shown["vec:L1:null0"] in tool_result and "null" not in tool_result and "peak " not in tool_result
