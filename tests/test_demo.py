"""The MiniLM demo: table and summary (fast), and the whole offline chain on small data (slow)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from caft.agent.config import OfflineJudgeConfig
from caft.app.demo import (
    DemoConfig,
    candidate_basis,
    demo_run_config,
    run_demo,
    seed_results,
    summarize,
)
from caft.app.demo_judge import REPLAY_MODEL
from caft.app.demo_report import format_table, loop_rows, write_demo_report
from caft.app.pipeline import enabled_stages
from caft.subspace import Column, Subspace


def test_summary_and_table_average_over_seeds() -> None:
    per_seed = {
        "0": {"plain": {"val": 1.0, "ood": 0.1}, "caft": {"val": 0.9, "ood": 0.8}, "k": 3},
        "1": {"plain": {"val": 1.0, "ood": 0.3}, "caft": {"val": 1.0, "ood": 0.6}, "k": 4},
    }
    summary = summarize(per_seed)
    assert summary["plain"]["ood"] == pytest.approx(0.2)
    assert summary["caft"]["val"] == pytest.approx(0.95)
    assert "random" not in summary
    table = format_table({"summary": summary, "per_seed": per_seed})
    assert "CAFT (offline judge)" in table and "80% / 60%" in table
    assert table.splitlines()[1].startswith("plain fine-tuning")


def test_html_report_escapes_labels_and_shows_every_condition(tmp_path: Path) -> None:
    per_seed = {
        "0": {
            "plain": {"val": 1.0, "ood": 0.05},
            "caft": {"val": 1.0, "ood": 0.9},
            "k": 1,
            "selected": [
                {"candidate": "pc:L1:0", "label": "<script>alert(1)</script> food", "confidence": 0.8}
            ],
        },
        "1": {"plain": {"val": 1.0, "ood": 0.15}, "caft": {"val": 0.98, "ood": 0.7}, "k": 0, "selected": []},
    }
    report = {
        "task": "sentiment-topic",
        "seeds": 2,
        "summary": summarize(per_seed),
        "per_seed": per_seed,
        "timings_s": {"train": 12.5},
        "wall_s": 30.0,
    }
    page = write_demo_report(report, tmp_path).read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; food" in page
    assert page.count("<svg") == 1 and "CAFT (offline judge)" in page and "plain fine-tuning" in page
    assert "80.0%" in page and "90% / 70%" in page  # CAFT mean OOD and per-seed values
    assert "seed 1: 0 directions" in page and "<td>train</td>" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch


def test_html_report_shows_the_loop_rounds_of_each_seed(tmp_path: Path) -> None:
    rounds = [
        {
            "round": 0,
            "subspace_dims": 6,
            "counts": {"10": 1, "2": 5},
            "added": 6,
            "eval": {"val": 1.0, "ood": 0.4},
        },
        {
            "round": 1,
            "selected": ["pc:L2:3", "<b>x</b>"],
            "added": 2,
            "subspace_dims": 8,
            "counts": {"2": 6, "10": 2},
            "eval": {"val": 0.99, "ood": 0.875},
            "seconds": 41.5,
        },
        {"round": 2, "selected": [], "added": 0, "seconds": 3.0},
    ]
    rows = loop_rows(rounds)
    assert [r["dims"] for r in rows] == ["6", "8", "-"]
    assert rows[0]["counts"] == "L2: 5, L10: 1" and rows[1]["ood"] == "87.5%" and rows[2]["val"] == "-"
    per_seed = {
        "3": {
            "plain": {"val": 1.0, "ood": 0.0},
            "caft": {"val": 0.99, "ood": 0.875},
            "selected": [],
            "loop": rounds,
        },
        "4": {"plain": {"val": 1.0, "ood": 0.0}, "caft": {"val": 1.0, "ood": 0.5}, "selected": []},
    }
    report = {"task": "t", "seeds": 2, "summary": summarize(per_seed), "per_seed": per_seed}
    page = write_demo_report(report, tmp_path).read_text()
    assert "Closed loop" in page and page.count("<h3>seed 3</h3>") == 1 and "<h3>seed 4</h3>" not in page
    assert (
        "<td>pc:L2:3, &lt;b&gt;x&lt;/b&gt;</td>" in page
        and "<td>87.5%</td>" in page
        and "<td>41.5</td>" in page
    )
    no_loop = write_demo_report({**report, "per_seed": {"4": per_seed["4"]}}, tmp_path / "b").read_text()
    assert "Closed loop" not in no_loop


def test_causal_lm_demo_gets_the_contrast_basis_like_the_encoder_demo(tmp_path: Path) -> None:
    from caft.testing import save_tiny

    lm = save_tiny(tmp_path / "lm", "llama", template="chatml", layers=4)
    default = demo_run_config(DemoConfig(model=str(lm)), tmp_path / "seed0", 0)
    assert default.evidence.contrast.basis == 1 and default.triage.offline.use_contrast
    off = demo_run_config(DemoConfig(model=str(lm), contrast_basis=0), tmp_path / "seed0", 0)
    assert off.evidence.contrast.basis == 0


def test_the_caft_row_names_an_llm_judge(tmp_path: Path) -> None:
    per_seed = {"0": {"plain": {"val": 1.0, "ood": 0.0}, "caft": {"val": 1.0, "ood": 0.9}}}
    report = {"task": "t", "seeds": 1, "summary": summarize(per_seed), "per_seed": per_seed}
    assert "CAFT (offline judge)" in format_table(report)
    llm = {**report, "config": {"triage_judge": "openai/gpt-4.1"}}
    assert "CAFT (openai/gpt-4.1)" in format_table(llm) and "offline" not in format_table(llm)
    page = write_demo_report(llm, tmp_path).read_text()
    assert "the judge (openai/gpt-4.1) read" in page and "offline judge" not in page
    assert "CAFT (replayed LLM judge)" in format_table({**report, "config": {"triage_replay": "x.jsonl"}})


def test_config_rejects_unknown_task_and_condition() -> None:
    with pytest.raises(ValueError, match="sentiment-topic"):
        DemoConfig.model_validate({"task": "nope"})
    with pytest.raises(ValueError, match="unknown condition"):
        DemoConfig.model_validate({"conditions": ["plain", "randm"]})


def _fake_encoder(tmp_path: Path) -> Path:
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 3}))
    return enc


def test_demo_builds_one_classification_run_config(tmp_path: Path) -> None:
    cfg = DemoConfig(model_path=str(_fake_encoder(tmp_path)), epochs=1.5, n_components=7, max_per_layer=3)
    rc = demo_run_config(cfg, tmp_path / "seed4", 4)
    data = tmp_path / "seed4" / "data"
    assert rc.out_dir == str(tmp_path / "seed4" / "run") and rc.seed == 4 and rc.task_kind == "classification"
    assert rc.model.kind == "encoder" and rc.model.device == "cpu" and rc.task == str(data / "task.yaml")
    t = rc.train
    assert (t.objective, t.method, t.freeze_embeddings) == ("encoder_classifier", "full", True)
    assert (t.optim.epochs, t.optim.lr, t.optim.head_lr, t.optim.batch_size) == (1.5, 3e-5, 1e-3, 32)
    assert t.seed == 4 and t.data.path == str(data / "train.jsonl") and t.ablation.mode == "project"
    d = rc.diff
    assert d.layers == [0, 1, 2] and d.inputs.data == [str(data / "train.jsonl")] and d.inputs.tokens == "all"
    assert d.n_components == 7 and d.include_mean is False
    e = rc.evidence
    assert e.corpus == str(data / "corpus.jsonl") and e.top_k == 20 and not e.candidates
    assert not e.diff_summary and not e.logit_lens and not e.steering.enabled
    assert rc.triage.kind == "offline-embedding" and rc.triage.controls_per_layer == 20
    pol = rc.triage.selection
    assert (pol.threshold, pol.max_per_layer, pol.max_total) == (0.5, 3, None)
    assert rc.baselines.enabled == ["random", "topk"] and rc.eval_models == ["ft", "caft"]
    cc = rc.classification
    assert cc.val == str(data / "val.jsonl") and cc.ood == str(data / "ood.jsonl") and cc.test_time_baseline
    assert enabled_stages(rc) == [
        "train",
        "diff",
        "evidence",
        "triage",
        "caft",
        "baselines",
        "eval",
        "report",
    ]
    # the default judge is the contrast rule (contrast basis, scored by the minimal pairs); --set turns it off
    assert rc.evidence.contrast.basis == 1
    oj = rc.triage.offline
    assert (oj.use_contrast, oj.contrast_veto, oj.contrast_min_share) == (True, 2.0, 0.5)
    old = DemoConfig.model_validate(
        {"model_path": cfg.model_path, "contrast_basis": 0, "judge": {"use_contrast": False}}
    )
    rc_old = demo_run_config(old, tmp_path / "seed5", 5)
    assert rc_old.evidence.contrast.basis == 0 and not rc_old.triage.offline.use_contrast
    # conditions switch the pipeline's baselines
    fewer = DemoConfig(model_path=cfg.model_path, conditions=["plain", "caft", "topk"])
    rc2 = demo_run_config(fewer, tmp_path / "seed0", 0)
    assert rc2.baselines.enabled == ["topk"] and not rc2.classification.test_time_baseline


def test_llm_judge_gets_the_same_controls_and_policy_as_the_offline_one(tmp_path: Path) -> None:
    enc = str(_fake_encoder(tmp_path))
    offline = demo_run_config(DemoConfig(model_path=enc, max_per_layer=3), tmp_path / "s0", 0).triage
    llm = demo_run_config(
        DemoConfig(model_path=enc, max_per_layer=3, triage_judge="openai/gpt-4.1"), tmp_path / "s0", 0
    ).triage
    assert offline.kind == "offline-embedding" and llm.kind == "single"
    assert llm.judge.model == "openai/gpt-4.1" and llm.blind
    assert llm.controls_per_layer == offline.controls_per_layer == 20
    assert llm.selection == offline.selection
    replayed = demo_run_config(
        DemoConfig(model_path=enc, triage_replay=str(tmp_path / "x.jsonl")), tmp_path / "s0", 0
    ).triage
    assert replayed.kind == "single" and replayed.judge.model == REPLAY_MODEL


def test_seed_results_are_built_from_the_pipeline_outputs(tmp_path: Path) -> None:
    import torch

    run = tmp_path / "run"
    sel = [{"candidate": "pc:L1:0", "label": "food", "confidence": 0.9, "layer": 1}]
    (run / "triage").mkdir(parents=True)
    (run / "triage" / "selection.json").write_text(json.dumps({"selected": sel, "rejected": []}))
    Subspace.from_vectors(
        {1: torch.eye(4)[:1], 2: torch.eye(4)[1:3]}, d_model=4, provenance={1: [Column("pc:L1:0")]}
    ).save(run / "triage" / "subspace")

    def mc(i: float, o: float) -> dict[str, Any]:
        return {"id": {"rate": i, "n": 4}, "ood": {"rate": o, "n": 4}}

    summary = {
        "stages": {
            "triage": {"seconds": 1.0},
            "eval": {"seconds": 3.0, "ft": mc(1.0, 0.25), "caft": mc(1.0, 0.75), "topk": mc(0.5, 0.5)},
        }
    }
    row = seed_results(run, summary)
    assert row["plain"] == {"val": 1.0, "ood": 0.25} and row["caft"] == {"val": 1.0, "ood": 0.75}
    assert row["topk"] == {"val": 0.5, "ood": 0.5} and "random" not in row and "test_time" not in row
    assert row["k"] == 3 and row["selected"] == [
        {"candidate": "pc:L1:0", "label": "food", "confidence": 0.9, "basis": "pca"}
    ]
    assert "loop" not in row
    table = format_table({"summary": summarize({"0": row}), "per_seed": {"0": row}})
    assert [line.split("  ")[0] for line in table.splitlines()[1:]] == [
        "plain fine-tuning",
        "CAFT (offline judge)",
        "top PCs by variance",
    ]


@pytest.mark.slow
def test_demo_runs_offline_end_to_end_on_minilm(tmp_path: Path, minilm_dir: Path) -> None:
    cfg = DemoConfig(
        sizes={"train": 96, "val": 32, "ood": 32, "corpus": 64},
        n_components=4,
        null_per_layer=4,
        top_k_windows=5,
        epochs=1,
        model_path=str(minilm_dir),
    )
    report = run_demo(out=tmp_path, config=cfg)
    seed = report["per_seed"]["0"]
    for cond in ("plain", "caft", "test_time", "oracle"):
        assert 0.0 <= seed[cond]["ood"] <= 1.0 and 0.0 <= seed[cond]["val"] <= 1.0
    run = tmp_path / "seed0" / "run"
    verdicts = (run / "triage" / "verdicts.jsonl").read_text().splitlines()
    # every PC and each concept's contrast direction (the default contrast basis) of every layer judged, nulls not
    assert len(verdicts) == 6 * (4 + 2)
    assert sum(":ct-" in json.loads(v)["candidate"] for v in verdicts) == 6 * 2
    assert all(json.loads(v)["judge"] == "offline-embedding" for v in verdicts)
    selection = json.loads((run / "triage" / "selection.json").read_text())
    assert len(selection["selected"]) == seed["k"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["stages"]["triage"]["judge"] == "offline-embedding"
    if seed["k"]:
        assert "random" in seed and "topk" in seed
        assert summary["stages"]["baselines"]["ran"] == ["random", "topk"]
        assert seed["caft"] == {
            "val": summary["stages"]["eval"]["caft"]["id"]["rate"],
            "ood": summary["stages"]["eval"]["caft"]["ood"]["rate"],
        }
    timings = json.loads((tmp_path / "results.json").read_text())["timings_s"]
    assert timings["train"] > 0 and timings["oracle"] > 0
    assert "CAFT (offline judge)" in (tmp_path / "report.html").read_text()
    # a rerun resumes: every stage is found finished, results are identical
    again = run_demo(out=tmp_path, config=cfg)
    assert again["per_seed"] == report["per_seed"]


def test_demo_on_a_causal_lm_runs_multiple_choice_with_one_ablation_mode(tmp_path: Path) -> None:
    """`caft demo --model X`: the choice data, the choice_lm fine-tune, and every ablation of the run
    (caft, random, top-k, test-time) in the causal-LM default mode `mean`; on a tiny llama."""
    from caft.testing import save_tiny

    lm = save_tiny(tmp_path / "lm", "llama", template="chatml", layers=4)
    cfg = DemoConfig(
        model=str(lm),
        form="double",
        sizes={"train": 32, "val": 16, "ood": 16, "corpus": 24},
        steps=2,
        n_components=3,
        null_per_layer=2,
        top_k_windows=3,
        layers=[1, 2],
        # the windows judge: on a random tiny llama the contrast rule selects nothing, and this test is
        # about the causal-LM path (baselines, modes), not about the judge
        contrast_basis=0,
        judge=OfflineJudgeConfig(),
    )
    out = tmp_path / "out"
    rc = demo_run_config(cfg, out / "seed0", 0)
    data = out / "seed0" / "data"
    t = rc.train
    assert rc.model.kind == "causal_lm" and rc.model.name_or_path == str(lm)
    assert (t.objective, t.method, t.freeze_embeddings, t.ablation.mode) == (
        "choice_lm",
        "full",
        True,
        "mean",
    )
    assert (t.optim.lr, t.optim.batch_size, t.optim.grad_accum, t.optim.max_steps) == (2e-5, 16, 1, 2)
    assert rc.diff.layers == [1, 2] and rc.diff.inputs.text_field == "prompt"
    assert t.data.path == str(data / "train.jsonl") and rc.classification.ood == str(data / "ood.jsonl")
    assert DemoConfig(model=str(lm), ablation_mode="project").model_dump()["ablation_mode"] == "project"

    report = run_demo(out=out, config=cfg)
    row = report["per_seed"]["0"]
    assert {"plain", "caft", "random", "topk"} <= set(row) and "oracle" not in row
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("Two questions about one text.") and len(first["options"]) == 2
    run = out / "seed0" / "run"
    for folder in (run / "caft", run / "baselines" / "random", run / "baselines" / "topk"):
        record = json.loads((folder / "caft_training.json").read_text())
        assert record["ablation"]["mode"] == "mean", folder
    if row["k"]:
        summary = json.loads((run / "eval" / "test_time" / "summary.json").read_text())
        assert summary["test_time_ablation"]["mode"] == "mean" and "test_time" in row


def test_demo_and_run_take_a_user_dataset_folder(tmp_path: Path) -> None:
    """`caft demo --data DIR` / `caft run --data DIR`: any folder in the spurious format, files renamed in
    meta.json; a folder without meta.json or with a missing file is refused with the file named."""
    from caft.app.run_config import RunConfig
    from caft.app.spurious import dataset_files, dataset_overrides, write_spurious
    from caft.config import apply_overrides
    from caft.errors import DataError

    data = tmp_path / "mine"
    write_spurious("topic-sentiment", data, seed=1, sizes={"train": 20, "val": 8, "ood": 8, "corpus": 6})
    (data / "ood.jsonl").rename(data / "shifted.jsonl")
    meta = json.loads((data / "meta.json").read_text())
    meta["files"]["ood"] = "shifted.jsonl"
    (data / "meta.json").write_text(json.dumps(meta))
    cfg = DemoConfig(model_path=str(_fake_encoder(tmp_path)), data=str(data))
    rc = demo_run_config(cfg, tmp_path / "seed0", 0)
    assert rc.train.data.path == str(data / "train.jsonl") and rc.task == str(data / "task.yaml")
    assert rc.classification.ood == str(data / "shifted.jsonl") and rc.evidence.corpus == str(
        data / "corpus.jsonl"
    )
    base = {"model": {"name_or_path": "m", "kind": "encoder"}, "train": {"objective": "encoder_classifier"}}
    run = RunConfig.model_validate(apply_overrides(base, dataset_overrides(data)))
    assert run.task_kind == "classification" and run.classification.ood == str(data / "shifted.jsonl")
    assert run.train.data.path == str(data / "train.jsonl")
    (data / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match=r"missing corpus \(corpus.jsonl\)"):
        dataset_files(data)
    (data / "meta.json").unlink()
    with pytest.raises(DataError, match="no meta.json"):
        dataset_files(data)


def test_report_shows_the_evidence_of_selected_and_close_rejected_directions(tmp_path: Path) -> None:
    """Each seed's selected and closest rejected directions with readable windows, their score against the
    random controls, the per-layer counts, the spread over seeds and the commit; corpus text stays escaped."""
    from caft.agent.fixtures import make_dossier
    from caft.interp.schema import dossier_filename

    run = tmp_path / "seed0" / "run"
    (run / "evidence" / "dossiers").mkdir(parents=True)
    evil = make_dossier("pc:L1:0", 1, "evil", injection="<script>x</script>")
    close = make_dossier("pc:L2:3", 2, "weather", index=3)
    for d in (evil, close):
        (run / "evidence" / "dossiers" / dossier_filename(d.candidate.id)).write_text(d.model_dump_json())
    (run / "triage").mkdir()
    sel = {
        "selected": [{"candidate": "pc:L1:0", "layer": 1, "label": "evil"}],
        "policy": {},
        "calibration": None,
    }
    (run / "triage" / "selection.json").write_text(json.dumps(sel))

    def rec(cid: str, z: float, relation: str) -> str:
        v = {
            "label": cid,
            "relation": relation,
            "confidence": 0.7,
            "evidence": [],
            "description": "",
            "rationale": "",
        }
        return json.dumps({"candidate": cid, "verdict": v, "scores": {"z": z}}) + "\n"

    lines = [
        rec("pc:L1:0", 2.5, "undesired"),
        rec("pc:L2:3", 0.9, "unrelated"),
        rec("pc:L2:4", -1.0, "intended"),
    ]
    lines += [rec(f"vec:L1:null{i}", z, "unrelated") for i, z in enumerate([1.0, 0.2, -0.5])]
    (run / "triage" / "verdicts.jsonl").write_text("".join(lines))
    (run / "manifest.json").write_text(json.dumps({"git": {"commit": "abc123", "dirty": False}}))
    per_seed = {
        "0": {"plain": {"val": 1.0, "ood": 0.1}, "caft": {"val": 1.0, "ood": 0.9}, "selected": []},
        "1": {"plain": {"val": 1.0, "ood": 0.3}, "caft": {"val": 1.0, "ood": 0.5}, "selected": []},
    }
    report = {
        "task": "t",
        "seeds": 2,
        "summary": summarize(per_seed),
        "per_seed": per_seed,
        "config": {"seeds": 2},
    }
    page = write_demo_report(report, tmp_path).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<code>pc:L1:0</code><br>selected" in page and "<code>pc:L2:3</code><br>rejected" in page
    assert "0 of 3 controls" in page and "1 of 3 controls" in page  # z 2.5 beats every control; 0.9 one
    assert "Selected per layer: L1: 1." in page and "Random controls judged: 3" in page
    assert "<b>destroy</b>" in page and "abc123" in page
    assert "70.0%" in page and "28.3%" in page  # CAFT mean OOD and its sd over the two seeds


def test_candidate_basis_names_where_a_direction_came_from() -> None:
    assert candidate_basis("pc:L3:0") == "pca"
    assert candidate_basis("vec:L2:ct-sentiment-0") == "contrast:sentiment"
    assert candidate_basis("vec:L2:ct-word-order-3") == "contrast:word-order"
    assert candidate_basis("sae:L1:77") == "sae"
    assert candidate_basis("vec:L0:mean") == "vector"


@pytest.mark.slow
def test_demo_with_contrast_basis_and_loop_on_minilm(tmp_path: Path, minilm_dir: Path) -> None:
    """The contrast basis flows through evidence, judge and selection; the loop runs one round and the
    later stages use its final model and subspace."""
    cfg = DemoConfig.model_validate(
        {
            "task": "topic-sentiment",
            "sizes": {"train": 96, "val": 32, "ood": 32, "corpus": 96},
            "n_components": 3,
            "null_per_layer": 3,
            "top_k_windows": 4,
            "epochs": 1,
            "model_path": str(minilm_dir),
            "conditions": ["plain", "caft", "topk", "test_time"],
            "contrast_basis": 1,
            "loop_rounds": 1,
            "judge": {"use_contrast": True, "contrast_veto": 2, "contrast_min_share": 0.5},
        }
    )
    report = run_demo(out=tmp_path, config=cfg)
    seed = report["per_seed"]["0"]
    run = tmp_path / "seed0" / "run"
    dossier = json.loads((run / "evidence" / "dossiers" / "vec_L0_ct-sentiment-0.json").read_text())
    by = {r["concept"]: r for r in dossier["contrast"]}
    assert by["sentiment"]["share"] == pytest.approx(1.0, abs=1e-3) and by["sentiment"]["n"] > 1
    assert abs(by["topic"]["share"]) < 0.5
    # the judge decides from the task text that sentiment is the undesired concept
    picked = {p["candidate"]: p["basis"] for p in seed["selected"]}
    assert picked.get("vec:L0:ct-sentiment-0") == "contrast:sentiment"
    assert not any(b == "contrast:topic" for b in picked.values())
    loop = json.loads((run / "caft" / "loop.json").read_text())
    assert seed["loop"] == loop["rounds"] and loop["rounds"][0]["round"] == 0
    assert 0.0 <= loop["rounds"][0]["eval"]["ood"] <= 1.0
    assert len(loop["rounds"]) == 2 and loop["rounds"][1]["round"] == 1
    if loop["rounds"][1]["added"]:
        assert seed["k_final"] == loop["subspace_dims"] > seed["k"]
        summary = json.loads((run / "summary.json").read_text())
        counts = summary["stages"]["baselines"]["counts"]
        assert sum(counts.values()) == loop["subspace_dims"]  # baselines match the final subspace
    else:
        assert loop["stopped"] == "nothing new" and loop["subspace"] is None

    # the same evidence on a run's own page (caft run's report stage writes report/selection.html)
    from caft.app.report_evidence import write_selection_page

    sel_page = write_selection_page(run, tmp_path / "rep")
    assert sel_page is not None
    text = sel_page.read_text()
    # which PCs come close depends on the run: some rejected PC is shown with its evidence (escaping of hostile
    # labels on this page: test_report_shows_the_evidence_of_selected_and_close_rejected_directions)
    assert re.search(r"<code>pc:L\d+:\d+</code><br>rejected", text) and "<script>" not in text
    commit = (json.loads((run / "manifest.json").read_text()).get("git") or {}).get("commit")
    assert commit is None or str(commit) in text
    assert write_selection_page(tmp_path / "nothing", tmp_path / "rep2") is None


def test_a_user_dataset_folder_becomes_multiple_choice_for_a_causal_lm(tmp_path: Path) -> None:
    """`caft demo --model M --data DIR`: the user's folder (files renamed in meta.json) is converted to the
    choice form in the seed's data/, not read in place as classification rows."""
    from caft.app.demo_lm import write_lm_data
    from caft.app.spurious import write_spurious

    data = tmp_path / "mine"
    write_spurious("sentiment-topic", data, seed=3, sizes={"train": 12, "val": 6, "ood": 6, "corpus": 6})
    (data / "ood.jsonl").rename(data / "shifted.jsonl")
    meta = json.loads((data / "meta.json").read_text())
    meta["files"]["ood"] = "shifted.jsonl"
    (data / "meta.json").write_text(json.dumps(meta))
    cfg = DemoConfig(model="some-causal-lm", data=str(data))
    write_lm_data(cfg, tmp_path / "seed0", 0)
    rows = [json.loads(x) for x in (tmp_path / "seed0" / "data" / "ood.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["options"]) == 2 and "prompt" in r for r in rows)
    assert not (tmp_path / "seed0" / "spurious").exists()  # nothing generated: the user's rows were used
