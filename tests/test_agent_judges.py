"""The one judge contract: `make_judge` picks the judge `triage.kind` names, `run_triage` runs any of them,
control dossiers are judged but never selected, and the subspace records the model's layer count."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from caft.agent.config import OfflineJudgeConfig, TriageConfig
from caft.agent.fixtures import concept_of_text, concept_set, make_dossier, verdict_for, write_evidence
from caft.agent.judges import JudgeRun, make_judge
from caft.agent.loop import AgentJudge
from caft.agent.offline import OfflineEmbeddingJudge
from caft.agent.render import blind_aliases
from caft.agent.schema import TaskDescription, VerdictRecord
from caft.agent.single import SingleLLMJudge
from caft.agent.triage import run_triage
from caft.app.run_config import RunConfig
from caft.errors import DataError
from caft.interp.schema import Dossier, dossier_filename
from caft.llm import GenerateConfig, Message, MockProvider
from caft.rundir import JsonlWriter
from caft.subspace import Subspace


def _cfg(**kw: Any) -> TriageConfig:
    return TriageConfig(task="emergent-misalignment", judge={"model": "mock/j"}, **kw)


def test_make_judge_follows_kind_and_controls_default_by_kind() -> None:
    single, agent, offline = (make_judge(_cfg(kind=k)) for k in ("single", "agent", "offline-embedding"))
    assert isinstance(single, SingleLLMJudge) and single.controls_per_layer == 0
    assert isinstance(agent, AgentJudge) and agent.controls_per_layer == 0
    assert isinstance(offline, OfflineEmbeddingJudge) and offline.controls_per_layer == 20
    assert offline.name == "offline-embedding"
    assert make_judge(_cfg(kind="single", controls_per_layer=3)).controls_per_layer == 3
    assert make_judge(_cfg(kind="offline-embedding", controls_per_layer=0)).controls_per_layer == 0
    # the old names fail and say where they went
    with pytest.raises(ValueError, match=r"triage\.mode is now triage\.kind: write `kind: agent`"):
        TriageConfig.model_validate({"mode": "agent"})
    with pytest.raises(ValueError, match=r"triage_judge is now triage\.kind"):
        RunConfig.model_validate({"model": {"name_or_path": "m"}, "triage_judge": "offline-embedding"})
    with pytest.raises(ValueError, match=r"offline_judge is now triage\.offline"):
        RunConfig.model_validate({"model": {"name_or_path": "m"}, "offline_judge": {}})


def _says_everything_is_evil(messages: list[Message], config: GenerateConfig) -> Any:
    return verdict_for("evil").model_dump()


def _controls(root: Path, n: int = 3) -> Path:
    """Control dossiers (random directions, ids like the stage's) in their own evidence folder."""
    ctl = [make_dossier(f"vec:L1:null{i}", 1, "evil", index=i) for i in range(n)]
    folder = root / "controls" / "evidence" / "dossiers"
    folder.mkdir(parents=True)
    for d in ctl:
        (folder / dossier_filename(d.candidate.id)).write_text(d.model_dump_json())
    return folder.parent


def test_an_llm_judge_judges_the_controls_but_never_selects_them(tmp_path: Path) -> None:
    """A judge that calls every random direction undesired: the controls are counted against it in the
    summary and stay out of the selection and the subspace (they used to crash build_subspace)."""
    pairs = concept_set(1)
    ev = write_evidence(tmp_path, [d for d, _ in pairs])
    controls = _controls(tmp_path)
    provider = MockProvider("j", _says_everything_is_evil)
    # calibrated (the default), the threshold rises above the controls' 0.9: nothing is selected
    calibrated = run_triage(
        _cfg(controls_per_layer=3), ev, tmp_path / "cal", controls_dir=controls, n_layers=4, provider=provider
    )
    assert calibrated.selection.selected == [] and calibrated.summary["calibration"]["threshold"] > 0.9
    res = run_triage(
        _cfg(controls_per_layer=3, calibration={"enabled": False}),
        ev,
        controls_dir=controls,
        n_layers=4,
        provider=provider,
    )
    judged = {json.loads(x)["candidate"] for x in (res.out_dir / "verdicts.jsonl").read_text().splitlines()}
    assert {f"vec:L1:null{i}" for i in range(3)} <= judged
    picked = {c.candidate for c in res.selection.selected}
    assert picked == {d.candidate.id for d, _ in pairs} and not any("null" in c for c in picked)
    assert res.summary["controls"] == {"n": 3, "judged": 3, "undesired": 3}
    sub = Subspace.load(res.out_dir / "subspace")
    assert sub.n_layers == 4 and sub.total_dims == len(pairs)
    assert res.complete and (res.out_dir / "DONE.json").is_file()


def test_controls_that_share_ids_with_the_candidates_are_refused(tmp_path: Path) -> None:
    pairs = concept_set(1)
    ev = write_evidence(tmp_path, [d for d, _ in pairs])
    with pytest.raises(DataError, match="share ids"):
        run_triage(_cfg(), ev, controls_dir=ev, provider=MockProvider("j", _says_everything_is_evil))


class _ScriptedJudge:
    """A judge of the contract written in the test: it reads the concept off each dossier."""

    name = "scripted"
    controls_per_layer = 0

    def __init__(self) -> None:
        self.seen_controls: list[str] = []

    async def judge(
        self,
        dossiers: Sequence[Dossier],
        task: TaskDescription,
        out_dir: Path,
        *,
        controls: Sequence[Dossier] = (),
        directions: Mapping[str, Any] | None = None,
    ) -> JudgeRun:
        self.seen_controls = [d.candidate.id for d in controls]
        recs = [
            VerdictRecord(
                candidate=d.candidate.id,
                judge=self.name,
                method="scripted",
                verdict=verdict_for(concept_of_text(d.model_dump_json())),
            )
            for d in [*dossiers, *controls]
        ]
        with JsonlWriter(out_dir / "verdicts.jsonl") as w:
            for r in recs:
                w.write(r.model_dump(mode="json"))
        return JudgeRun(records=recs, complete=True, summary={"judged": len(recs)})


def test_run_triage_runs_any_judge_of_the_contract(tmp_path: Path) -> None:
    pairs = concept_set(2)
    ev = write_evidence(tmp_path, [d for d, _ in pairs])
    judge = _ScriptedJudge()
    # its controls read as evil 0.9; calibration would raise the threshold above every candidate
    res = run_triage(
        _cfg(calibration={"enabled": False}), ev, controls_dir=_controls(tmp_path, 2), judge=judge
    )
    assert judge.seen_controls == ["vec:L1:null0", "vec:L1:null1"]
    evil = {d.candidate.id for d, c in pairs if c == "evil"}
    assert {c.candidate for c in res.selection.selected} == evil
    assert res.summary["judge"] == "scripted" and res.summary["kind"] == "single"
    info = json.loads((res.out_dir / "triage.json").read_text())
    assert info["judge"] == "scripted" and info["controls"].endswith("evidence")


def test_offline_kind_through_run_triage_calibrates_against_the_controls(
    tmp_path: Path, minilm_dir: Path
) -> None:
    from caft.agent.embedder import TextEmbedder

    pairs = concept_set(2)
    ev = write_evidence(tmp_path, [d for d, _ in pairs])
    cfg = _cfg(kind="offline-embedding", offline=OfflineJudgeConfig(calibration="random", min_null=2))
    judge = OfflineEmbeddingJudge(cfg.offline, embedder=TextEmbedder(minilm_dir))
    res = run_triage(cfg, ev, controls_dir=_controls(tmp_path, 3), judge=judge)
    rows = [json.loads(x) for x in (res.out_dir / "verdicts.jsonl").read_text().splitlines()]
    assert {r["candidate"] for r in rows} == {d.candidate.id for d, _ in pairs}  # controls only calibrate
    assert all(r["judge"] == "offline-embedding" for r in rows)
    assert all("random directions" in r["verdict"]["rationale"] for r in rows)
    assert res.complete


def test_the_agents_finish_list_limits_the_selection_by_default(tmp_path: Path) -> None:
    """Issue 12.7: two undesired verdicts, one named in `finish`: only that one is ablated unless the policy
    says to ignore the list."""
    from caft.agent.config import SelectionPolicy

    evil = [make_dossier(f"pc:L1:{i}", 1, "evil", index=i) for i in range(2)]
    ev = write_evidence(tmp_path, evil)
    a, b = (d.candidate.id for d in evil)
    # blind by default: the agent names the opaque ids it was shown; verdicts and picks map back
    shown = blind_aliases([a, b], seed=0)

    def call(name: str, i: int, **arguments: Any) -> dict[str, Any]:
        return {"id": f"c{i}", "name": name, "arguments": arguments}

    script = [
        {"tool_calls": [call("record_verdict", 0, candidate=shown[a], **verdict_for("evil").model_dump())]},
        {"tool_calls": [call("record_verdict", 1, candidate=shown[b], **verdict_for("evil").model_dump())]},
        {"tool_calls": [call("finish", 2, selected=[shown[b]], notes="only the second")]},
    ]
    res = run_triage(_cfg(kind="agent"), ev, provider=MockProvider("agent", list(script)))
    assert res.complete and [c.candidate for c in res.selection.selected] == [b]
    assert "not in the agent's finish list" in res.selection.notes and a in res.selection.notes
    ignore = _cfg(kind="agent", selection=SelectionPolicy(require_chosen=False))
    res2 = run_triage(ignore, ev, tmp_path / "t2", provider=MockProvider("agent", list(script)))
    assert sorted(c.candidate for c in res2.selection.selected) == [a, b]
