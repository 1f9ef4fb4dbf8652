"""`caft run` never presents a stale result as new: stages record what they were computed from, a changed input
redoes that stage and every later one, and `--from` redoes for real (old folders are kept aside, not deleted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_pipeline import router, write_config
from typer.testing import CliRunner

from caft.app.cli import app
from caft.subspace import Subspace
from caft.testing.fakellm import FakeLLM, RecordedRequest

STAGES = ("train", "diff", "evidence", "triage", "caft", "baselines", "eval", "report")


def _finished(run: Path) -> dict[str, str]:
    """Per stage, something that changes whenever the stage runs again (its marker's time and inode)."""
    out = {}
    for s in STAGES:
        marker = run / s / "DONE.json"
        out[s] = f"{json.loads(marker.read_text())['finished_at']}:{marker.stat().st_ino}"
    return out


def _verdict_calls(reqs: list[RecordedRequest]) -> int:
    return sum(1 for r in reqs if not r.body.get("logprobs"))


def _grade_calls(reqs: list[RecordedRequest]) -> int:
    return sum(1 for r in reqs if r.body.get("logprobs"))


def _superseded(run: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in (run / ".superseded").iterdir())


def test_changed_selection_retrains_caft_and_regrades_and_from_diff_redoes_the_rest(tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    with FakeLLM() as fake:
        fake.on_request(router("pc:L1:0"))
        cfg_path = write_config(tmp_path, fake.openai_base_url)
        assert runner.invoke(app, ["run", str(cfg_path)]).exit_code == 0
        first = _finished(run)
        old_digest = Subspace.load(run / "triage" / "subspace").digest()
        assert Subspace.load(run / "triage" / "subspace").total_dims == 1

        # A changed selection policy (no --from): triage is redone, CAFT retrained on the new subspace, and the
        # eval regraded; the stages before triage are kept.
        n_grades = _grade_calls(fake.requests)
        res = runner.invoke(app, ["run", str(cfg_path), "--set", "triage.selection.threshold=1.0"])
        assert res.exit_code == 0, res.output
        second = _finished(run)
        assert all(second[s] == first[s] for s in ("train", "diff", "evidence"))
        assert all(second[s] != first[s] for s in ("triage", "caft", "baselines", "eval", "report"))
        sub = Subspace.load(run / "triage" / "subspace")
        assert sub.total_dims == 0 and sub.digest() != old_digest
        record = json.loads((run / "caft" / "caft_training.json").read_text())
        assert record["subspace_digest"] == sub.digest()
        assert _grade_calls(fake.requests) > n_grades  # the new CAFT model's answers were graded
        assert _superseded(run) == ["baselines", "caft", "eval", "report", "triage"]
        old_caft = next((run / ".superseded").glob("caft-*"))
        assert json.loads((old_caft / "caft_training.json").read_text())["subspace_digest"] == old_digest

        # --from diff keeps train and redoes diff and everything after it.
        res = runner.invoke(
            app, ["run", str(cfg_path), "--set", "triage.selection.threshold=1.0", "--from", "diff"]
        )
        assert res.exit_code == 0, res.output
        third = _finished(run)
        assert third["train"] == second["train"]
        assert all(third[s] != second[s] for s in STAGES[1:])
        summary = json.loads((run / "summary.json").read_text())
        assert summary["complete"] and all(summary["stages"][s]["fingerprint"] for s in STAGES)


def test_changed_judge_base_url_rejudges(tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    with FakeLLM() as fake:
        fake.on_request(router("pc:L1:0"))
        cfg_path = write_config(tmp_path, fake.openai_base_url)
        assert runner.invoke(app, ["run", str(cfg_path)]).exit_code == 0
    first = _finished(run)
    # Same judge name, another server: the verdicts and grades of the old server are not reused.
    with FakeLLM() as other:
        other.on_request(router("pc:L1:0"))
        url = other.openai_base_url
        sets: list[Any] = [
            "--set",
            f"triage.judge.base_url={other.openai_base_url}",
            "--set",
            f"eval.grade.judge.base_url={other.openai_base_url}",
        ]
        res = runner.invoke(app, ["run", str(cfg_path), *sets])
        assert res.exit_code == 0, res.output
        assert _verdict_calls(other.requests) >= 4 and _grade_calls(other.requests) > 0
    second = _finished(run)
    assert all(second[s] == first[s] for s in ("train", "diff", "evidence"))
    assert all(second[s] != first[s] for s in ("triage", "caft", "baselines", "eval", "report"))
    fp = json.loads((run / "triage" / "FINGERPRINT.json").read_text())
    assert fp["config"]["triage"]["judge"]["base_url"] == url


def test_a_second_run_on_the_same_folder_refuses(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    import pytest

    from caft.app.pipeline import run_pipeline
    from caft.app.run_config import RunConfig
    from caft.errors import RunDirError

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from caft.rundir import lock_dir\nwith lock_dir({str(out)!r}, 'test'):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        cfg = RunConfig.model_validate(
            {"model": {"name_or_path": "m"}, "out_dir": str(out), "finetuned": {"name_or_path": "f"}}
        )
        started = time.monotonic()
        with pytest.raises(RunDirError, match="caft.lock"):
            run_pipeline(cfg, check=False)
        assert time.monotonic() - started < 10  # refused at once
    finally:
        holder.kill()
        holder.wait()


def test_a_run_copied_with_its_inputs_resumes_and_a_changed_copied_input_still_redoes(tmp_path: Path) -> None:
    import shutil

    import yaml

    runner = CliRunner()
    src, dst = tmp_path / "a", tmp_path / "b"
    src.mkdir()
    with FakeLLM() as fake:
        fake.on_request(router("pc:L1:0"))
        cfg_path = write_config(src, fake.openai_base_url)
        assert runner.invoke(app, ["run", str(cfg_path)]).exit_code == 0
        shutil.copytree(src, dst)
        copied = dst / "run.yaml"
        copied.write_text(cfg_path.read_text().replace(str(src), str(dst)))
        assert str(src) not in copied.read_text()
        before = {s: json.loads((dst / "run" / s / "DONE.json").read_text())["finished_at"] for s in STAGES}
        n_requests = len(fake.requests)

        # Every path moved, no content changed: every stage is skipped, nothing is re-requested.
        res = runner.invoke(app, ["run", str(copied)])
        assert res.exit_code == 0, res.output
        after = {s: json.loads((dst / "run" / s / "DONE.json").read_text())["finished_at"] for s in STAGES}
        assert after == before
        assert not (dst / "run" / ".superseded").exists()
        assert len(fake.requests) == n_requests

        # The copy's training data changed: train and everything after it are redone in the copy.
        cfg = yaml.safe_load(copied.read_text())
        data = Path(cfg["train"]["data"]["path"])
        rows = data.read_text().splitlines()
        data.write_text("\n".join(rows[:-1]) + "\n")
        res = runner.invoke(app, ["run", str(copied)])
        assert res.exit_code == 0, res.output
        assert _superseded(dst / "run")[0] == "baselines" and "train" in _superseded(dst / "run")
        # The original run is untouched.
        assert not (src / "run" / ".superseded").exists()
