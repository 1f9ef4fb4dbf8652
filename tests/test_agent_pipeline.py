"""Real dossiers from the interp stages (tiny models) through `caft triage`, the review page and `apply`."""

from __future__ import annotations

import json
from pathlib import Path

from interp_helpers import chat_rows, make_pair, write_jsonl
from typer.testing import CliRunner

from caft.agent.fixtures import verdict_for
from caft.agent.render import DATA_CLOSE
from caft.app.cli import app
from caft.interp.schema import load_directions, load_dossiers
from caft.subspace import Subspace
from caft.testing.fakellm import FakeLLM, RecordedRequest, Reply


def test_interp_evidence_to_subspace(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    run = tmp_path / "run"
    models = [
        "--set",
        f"model.name_or_path={base.name_or_path}",
        "--set",
        f"finetuned.name_or_path={ft.name_or_path}",
    ]
    runner = CliRunner()
    res = runner.invoke(app, ["diff", "--run-dir", str(run), *models, "--set", f"inputs.data=[{data}]",
                              "--set", "layers=[1]", "--set", "n_components=3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evidence", "--run-dir", str(run), *models, "--set", "steering.enabled=false",
                              "--set", "top_k=3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    dossiers = load_dossiers(run / "evidence")
    target = dossiers[0].candidate.id
    seen: list[str] = []

    def judge(req: RecordedRequest) -> Reply:
        user = req.body["messages"][-1]["content"]
        seen.append(user)
        concept = "evil" if f"Candidate {target} " in user else "weather"
        return Reply(json=verdict_for(concept, evidence=["ex:max:0", "lens"]).model_dump())

    with FakeLLM() as fake:
        fake.on_request(judge)
        res = runner.invoke(app, ["triage", "--evidence", str(run / "evidence"), "--task", "emergent-misalignment",
                                  "--judge", "openai-compatible/j", "--base-url", fake.openai_base_url,
                                  "--set", "blind=false"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"{len(dossiers)} judged, 0 unscored" in res.output and "selected 1 directions" in res.output
    assert all(u.count("<<<DATA ") == u.count(DATA_CLOSE) > 0 for u in seen)

    sub = Subspace.load(run / "triage" / "subspace")
    assert sub.layers == [1] and sub.columns[1][0].candidate == target
    direction = load_directions(run / "diff")[target].float()
    q = sub.basis(1)[:, 0]
    assert abs(float(q @ direction) / float(direction.norm())) > 0.999

    res = runner.invoke(app, ["triage", "review", str(run)])
    assert res.exit_code == 0, res.output
    assert target in (run / "triage" / "review.html").read_text()
    sel = json.loads((run / "triage" / "selection.json").read_text())
    sel["selected"] = []
    (tmp_path / "none.json").write_text(json.dumps(sel))
    res = runner.invoke(
        app, ["triage", "apply", str(tmp_path / "none.json"), "--out", str(tmp_path / "empty")]
    )
    assert res.exit_code == 0 and "empty subspace" in res.output
    assert Subspace.load(tmp_path / "empty").is_empty
