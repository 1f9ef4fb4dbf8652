"""`caft triage` end to end against the fake wire server: run, resume, review, apply; bad input; empty outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caft.agent.fixtures import concept_of_text, concept_set, verdict_for, write_evidence
from caft.app.cli import app
from caft.app.commands.agent import parse_budget
from caft.errors import ConfigError
from caft.subspace import Subspace
from caft.testing.fakellm import FakeLLM, RecordedRequest, Reply

runner = CliRunner()


def _judge_reply(req: RecordedRequest) -> Reply:
    user = "\n".join(m["content"] for m in req.body["messages"] if m["role"] == "user")
    return Reply(json=verdict_for(concept_of_text(user)).model_dump())


def test_triage_run_resume_review_apply(tmp_path: Path) -> None:
    pairs = concept_set(2)
    ev = write_evidence(tmp_path, [d for d, _ in pairs])
    with FakeLLM() as fake:
        fake.on_request(_judge_reply)
        args = [
            "triage",
            "--evidence",
            str(ev),
            "--task",
            "emergent-misalignment",
            "--judge",
            "openai-compatible/fake-judge",
            "--base-url",
            fake.openai_base_url,
            "--set",
            "selection.threshold=0.8",
        ]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert "8 judged, 0 unscored" in res.output and "selected 2 directions" in res.output
        tdir = tmp_path / "triage"
        assert (tdir / "DONE.json").is_file()
        summary = json.loads((tdir / "summary.json").read_text())
        assert summary["complete"] and summary["usage"]["calls"] == 8
        sub = Subspace.load(tdir / "subspace")
        evil = sorted(d.candidate.id for d, c in pairs if c == "evil")
        assert sorted(c.candidate for cols in sub.columns.values() for c in cols if c.candidate) == evil
        n_requests = len(fake.requests)
        # rerun: everything is on disk, no new requests
        res2 = runner.invoke(app, args)
        assert res2.exit_code == 0 and len(fake.requests) == n_requests

    res = runner.invoke(app, ["triage", "review", str(tmp_path)])
    assert res.exit_code == 0, res.output
    page = (tdir / "review.html").read_text()
    assert all(d.candidate.id in page for d, _ in pairs)

    edited = json.loads((tdir / "selection.json").read_text())
    edited["selected"] = edited["selected"][:1]
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    res = runner.invoke(app, ["triage", "apply", str(tmp_path / "edited.json")])
    assert res.exit_code == 0, res.output
    assert Subspace.load(tmp_path / "subspace").total_dims == 1


def test_agent_mode_through_the_cli(tmp_path: Path) -> None:
    pairs = concept_set(1)
    evil = next(d.candidate.id for d, c in pairs if c == "evil")
    ev = write_evidence(tmp_path, [d for d, _ in pairs])
    verdict = {"candidate": evil, **verdict_for("evil").model_dump()}
    with FakeLLM() as fake:
        fake.reply_in_order(
            Reply(tool_calls=[{"name": "get_steering", "arguments": {"candidate": evil}}]),
            Reply(tool_calls=[{"name": "record_verdict", "arguments": verdict}]),
            Reply(tool_calls=[{"name": "finish", "arguments": {"selected": [evil], "notes": "one"}}]),
        )
        res = runner.invoke(
            app,
            [
                "triage",
                "--evidence",
                str(ev),
                "--kind",
                "agent",
                "--task",
                "emergent-misalignment",
                "--budget",
                "calls=10",
                "--judge",
                "openai-compatible/agent",
                "--base-url",
                fake.openai_base_url,
                "--set",
                "selection.require_chosen=true",
                "--set",
                "blind=false",  # the scripted tool calls name the real candidate id
            ],
        )
    assert res.exit_code == 0, res.output
    tdir = tmp_path / "triage"
    assert "selected 1 directions" in res.output and (tdir / "DONE.json").is_file()
    assert json.loads((tdir / "agent_result.json").read_text())["chosen"] == [evil]
    sub = Subspace.load(tdir / "subspace")
    assert [c.candidate for cols in sub.columns.values() for c in cols] == [evil]
    assert (tdir / "transcript.jsonl").is_file()


def test_nothing_undesired_gives_an_empty_subspace(tmp_path: Path) -> None:
    ev = write_evidence(tmp_path, [d for d, c in concept_set(1) if c != "evil"])
    with FakeLLM() as fake:
        fake.on_request(_judge_reply)
        res = runner.invoke(
            app,
            [
                "triage",
                "--evidence",
                str(ev),
                "--task",
                "spurious-correlation",
                "--judge",
                "openai-compatible/j",
                "--base-url",
                fake.openai_base_url,
            ],
        )
    assert res.exit_code == 0, res.output
    assert "selected nothing: nothing selected: none of 3 judged candidates" in res.output
    assert Subspace.load(tmp_path / "triage" / "subspace").is_empty


def test_bad_input_fails_cleanly(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["triage", "--evidence", str(tmp_path), "--task", "emergent-misalignment", "--judge", "mock/x"]
    )
    assert res.exit_code == 2 and "no dossiers in" in res.output
    ev = write_evidence(tmp_path, [concept_set(1)[0][0]])
    res = runner.invoke(app, ["triage", "--evidence", str(ev), "--task", "nope", "--judge", "mock/x"])
    assert res.exit_code == 2 and "bundled tasks" in res.output
    res = runner.invoke(app, ["triage", "--evidence", str(ev), "--judge", "mock/x", "--budget", "calls=x"])
    assert res.exit_code == 2 and "is not a number" in res.output
    res = runner.invoke(app, ["triage", "--evidence", str(ev), "--judge", "bogus"])
    assert res.exit_code == 2 and "judge.model" in res.output
    res = runner.invoke(app, ["triage", "--evidence", str(ev), "--judge", "mock/x"])
    assert res.exit_code == 2 and "no task description: pass --task" in res.output
    res = runner.invoke(
        app, ["triage", "--evidence", str(ev), "--task", "spurious-correlation", "--kind", "both"]
    )
    assert res.exit_code == 2 and "kind" in res.output and "single" in res.output
    res = runner.invoke(app, ["triage", "review", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no triage results" in res.output
    res = runner.invoke(app, ["triage"])
    assert res.exit_code == 2 and "pass --evidence" in res.output


def test_parse_budget() -> None:
    assert parse_budget("calls=40, tokens=2e5,live=3,usd=1.5") == {
        "max_calls": 40,
        "max_tokens": 200000,
        "max_live": 3,
        "max_usd": 1.5,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_budget("dollars=3")


def test_prefilter_sends_only_the_top_candidates_to_the_llm(tmp_path: Path) -> None:
    from caft.agent.config import PrefilterConfig, TriageConfig
    from caft.agent.schema import VerdictRecord
    from caft.agent.triage import run_triage
    from caft.llm import JudgeConfig
    from caft.rundir import JsonlWriter

    pairs = concept_set(2)
    ev = write_evidence(tmp_path, [d for d, _ in pairs])
    offline = tmp_path / "offline.jsonl"
    with JsonlWriter(offline) as w:
        for i, (d, c) in enumerate(pairs):
            rel = 90.0 - i if c == "evil" else 10.0 + i
            w.write(
                VerdictRecord(
                    candidate=d.candidate.id,
                    judge="offline-embedding",
                    method="offline-embedding",
                    relevance=rel,
                ).model_dump()
            )
    with FakeLLM() as fake:
        fake.on_request(_judge_reply)
        cfg = TriageConfig(
            task="emergent-misalignment",
            judge=JudgeConfig(model="openai-compatible/j", base_url=fake.openai_base_url),
            prefilter=PrefilterConfig(top_k=3, verdicts=str(offline)),
        )
        result = run_triage(cfg, ev)
        assert len(fake.requests) == 3
    assert result.summary["prefilter"] == {"method": "offline-embedding", "kept": 3, "skipped": 5}
    assert result.complete
    evil = sorted(d.candidate.id for d, c in pairs if c == "evil")
    assert sorted(s.candidate for s in result.selection.selected) == evil


def test_fatal_judge_error_is_a_clean_message_and_keeps_verdicts(tmp_path: Path) -> None:
    pairs = concept_set(1)
    ev = write_evidence(tmp_path, [d for d, _ in pairs])
    args = [
        "triage",
        "--evidence",
        str(ev),
        "--task",
        "emergent-misalignment",
        "--judge",
        "openai-compatible/j",
        "--set",
        "judge.max_concurrency=1",
        "--set",
        "blind=false",  # the fault rule matches the candidate id in the prompt
    ]
    with FakeLLM() as fake:
        fake.on_request(_judge_reply)
        first = pairs[2][
            0
        ].candidate.id  # sorted by layer: L1:0, L1:1, L2:0, L2:1 -> the third is judged third
        fake.add_rule(
            f"Candidate {first} ",
            lambda req: __import__("caft.testing.fakellm", fromlist=["Fault"]).Fault("401"),
        )
        res = runner.invoke(app, [*args, "--base-url", fake.openai_base_url])
        assert res.exit_code == 2 and "refused the request" in res.output and "are kept" in res.output
        assert not (tmp_path / "triage" / "DONE.json").exists()
        kept = (tmp_path / "triage" / "verdicts.jsonl").read_text().count("\n")
        assert kept >= 1
        fake.reset()
        fake.on_request(_judge_reply)
        res = runner.invoke(app, [*args, "--base-url", fake.openai_base_url])
        assert res.exit_code == 0, res.output
        assert len(fake.requests) == len(pairs) - kept
    assert (tmp_path / "triage" / "DONE.json").is_file()
