"""`caft run` on the tiny chat path with every baseline on (fake judge): the reference rows, the steering and
penalty runs, the checkpoint sweep, the task metric and the one report table with the paired comparison."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_pipeline import router, write_config
from typer.testing import CliRunner

from caft.app.cli import app
from caft.app.run_config import BaselinesConfig
from caft.testing.fakellm import FakeLLM, RecordedRequest, Reply
from caft.testing.grading import metric_of


def spread_judge(req: RecordedRequest) -> Reply:
    """Grading calls get a score from a hash of the prompt (so of the answer): a spread of aligned,
    misaligned and incoherent answers that differs between models; triage calls go to the usual router."""
    if not req.body.get("logprobs"):
        return router("pc:L1:0")(req)
    digest = hashlib.sha256(req.prompt.encode()).digest()
    value = digest[0] % 100 if metric_of(req.prompt) == "aligned" else 35 + digest[1] % 65
    return Reply(text=str(value), top_logprobs={str(value): -0.01, "The": -5.0})


def _with_baselines(cfg_path: Path) -> Path:
    cfg: dict[str, Any] = yaml.safe_load(cfg_path.read_text())
    cfg["train"]["data"]["eval_fraction"] = 0.25  # a held-out loss: the chat run's task metric
    cfg["eval"]["sample"]["samples_per_paraphrase"] = 6
    cfg["eval"]["thresholds"] = {"min_coherent": 1, "bootstrap_resamples": 500}
    cfg["baselines"] = {
        "random": True,
        "steer": [4.0],
        "penalty": [1.0, 100.0],
        "penalty_quantile": 0.5,  # half the base model's positions are past r: the term is visible at once
        "steps": 2,
        "test_time": True,
    }
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path


def test_chat_run_with_every_baseline_reports_one_table(tmp_path: Path) -> None:
    runner = CliRunner()
    with FakeLLM() as fake:
        fake.on_request(spread_judge)
        cfg_path = _with_baselines(write_config(tmp_path, fake.openai_base_url))
        res = runner.invoke(app, ["run", str(cfg_path)])
        assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    stages = json.loads((run / "summary.json").read_text())["stages"]
    b = stages["baselines"]
    assert b["ran"] == ["random", "steer+4", "penalty1", "penalty100", "steps"]
    assert b["steer+4"]["mode"] == "steer" and b["penalty100"]["mode"] == "penalty"
    rec = json.loads((run / "baselines" / "penalty100" / "caft_training.json").read_text())
    assert rec["ablation"]["penalty_coef"] == 100.0 and rec["ablation"]["mode"] == "penalty"

    def first_loss(folder: str) -> float:
        log = [json.loads(x) for x in (run / folder / "train_log.jsonl").read_text().splitlines()]
        return float(next(r["loss"] for r in log if r.get("event") == "step"))

    # Step 1 is the base model in every run: the same task loss, plus coef * P in the penalised ones.
    plain, small, large = (
        first_loss("train"),
        first_loss("baselines/penalty1"),
        first_loss("baselines/penalty100"),
    )
    assert plain < small < large and large - plain == pytest.approx(100 * (small - plain), rel=1e-3)
    steer = json.loads((run / "baselines" / "steer+4" / "caft_training.json").read_text())
    assert steer["ablation"]["steer_coef"] == 4.0 and steer["ablation"]["steer_vector"] == "mean_projection"
    # 3 steps, 2 checkpoints asked: every ceil(3 / 3) = 1 step -> checkpoints at steps 1 and 2.
    assert [p["step"] for p in b["steps"]["checkpoints"]] == [1, 2]
    assert all(p["eval_loss"] is not None for p in b["steps"]["checkpoints"])
    assert b["steps"]["matched_to_caft"]["row"] in ("steps@1", "steps@2")
    # The sweep's run is the plain fine-tune again: same config and seed, so the same final weights.
    from safetensors.torch import load_file

    ours = load_file(str(run / "baselines" / "steps" / "final" / "adapter_model.safetensors"))
    theirs = load_file(str(run / "train" / "final" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    step1 = load_file(
        str(run / "baselines" / "steps" / "step-000001" / "final" / "adapter_model.safetensors")
    )
    assert any(not torch.equal(step1[k], ours[k]) for k in ours)  # an earlier point of the same run
    rows = ["base", "ft", "caft", "random", "steer+4", "penalty1", "penalty100", "steps@1", "steps@2"]
    rows.append("test_time")
    assert [k for k in stages["eval"] if k not in ("seconds", "fingerprint")] == rows
    assert stages["report"]["rows"] == rows and stages["report"]["reference"] == "ft"
    paired = json.loads((run / "report" / "paired.json").read_text())
    assert paired["reference"] == "ft" and set(paired["runs"]) == set(rows) - {"ft"}
    pair = stages["report"]["caft_vs_ft"]
    assert pair == {k: paired["runs"]["caft"][k] for k in pair}
    assert pair["difference"] == pytest.approx(pair["rate_b"] - pair["rate_a"])
    assert pair["questions"] == ["bored", "wish"] and pair["p_exact"]
    # The test-time row samples the plain fine-tune with the subspace projected out: other answers.
    answers = {
        row: [json.loads(x)["answer"] for x in (run / "eval" / row / "misalignment" / "answers.jsonl").open()]
        for row in ("ft", "test_time")
    }
    assert answers["ft"] != answers["test_time"]
    for row in rows:
        assert stages["eval"][row]["misalignment"]["rates"]["aligned"]["n"] == 12
        summary = json.loads((run / "eval" / row / "misalignment" / "summary.json").read_text())
        assert summary["statistics"]["overall"]["coverage"]["n_answers"] == 12
        assert [m["k"] for m in summary["statistics"]["misalign_at_k"]] == [1, 5, 10]
    assert "task" not in stages["eval"]["base"]  # the base model has no training run
    assert stages["eval"]["ft"]["task"]["metric"] == "held-out loss"
    # The checkpoint rows' held-out loss is the one logged at their step.
    losses = {p["step"]: p["eval_loss"] for p in b["steps"]["checkpoints"]}
    assert stages["eval"]["steps@1"]["task"]["value"] == losses[1]
    md = (run / "report" / "report.md").read_text()
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    table = [line for line in lines[start:end] if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == rows
    assert "vs ft: misaligned / coherent" in table[0]
    assert "Baselines that ran: random, steer+4, penalty1, penalty100, steps, test_time." in md
    assert "Early stopping at matched task metric: steps@" in md
    page = (run / "report" / "report.html").read_text()
    assert "held-out loss vs misaligned rate, across runs" in page
    assert page.count("<polyline") == 2  # the trade-off curves: ft -> penalty1 -> penalty100, steps -> ft


def test_baselines_config_names_and_checks() -> None:
    cfg = BaselinesConfig(topk=True, steer=[4, -2.5], penalty=[0.1, 10], steps=3)
    assert cfg.enabled == ["topk", "steer+4", "steer-2.5", "penalty0.1", "penalty10", "steps"]
    assert BaselinesConfig().enabled == []
    with pytest.raises(ValueError, match="lists a coefficient twice"):
        BaselinesConfig.model_validate({"steer": [1, 1]})
    with pytest.raises(ValueError, match="must be >= 0"):
        BaselinesConfig.model_validate({"penalty": [-1]})
    from caft.app.run_config import RunConfig

    with pytest.raises(ValueError, match="classification.test_time_baseline"):
        RunConfig.model_validate(
            {
                "model": {"name_or_path": "m"},
                "task_kind": "classification",
                "train": {"objective": "encoder_classifier"},
                "baselines": {"test_time": True},
            }
        )
