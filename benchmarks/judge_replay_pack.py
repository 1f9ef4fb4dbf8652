"""Judge a demo seed with a judge that caft cannot call: export its blind prompts, collect replies, replay them.

For an LLM behind no API this session can reach (a model in another tool, or a person), the prompts that
caft's single-shot triage would send are written to a folder, one file each; the replies, written beside them
as JSON files, become an `exchanges.jsonl` that `caft demo --set triage_replay=...` and
`caft triage bench --replay ...` answer the same prompts with (caft.agent.bench.replay_provider). The judge sees
exactly what an API judge would (system prompt, blind dossier, the reply schema), nothing else.

    # 1. a demo seed with the candidate set to judge (any judge: only data/ and run/ up to evidence are read)
    caft demo --task topic-sentiment --set first_seed=2 --seeds 1 --out RUNS/off
    cp -r RUNS/off/seed2 RUNS/llm/seed2
    # 2. the prompts of the LLM triage (same --set flags as the demo, plus triage_replay=<any path>)
    python benchmarks/judge_replay_pack.py export RUNS/llm/seed2 PACK --seed 2 --set task=topic-sentiment \
        --set triage_replay=PACK/exchanges.jsonl
    # 3. write PACK/replies/<name>.json for every PACK/prompts/<name>.md (a JudgeVerdict object, PACK/schema.json)
    # 4. check the replies and build the exchanges
    python benchmarks/judge_replay_pack.py build PACK
    # 5. the downstream run with the judge's selection (triage reruns, nothing before it)
    caft demo --task topic-sentiment --set first_seed=2 --seeds 1 --set triage_replay=PACK/exchanges.jsonl --out RUNS/llm

`export` runs the triage stage once with a recorder that answers every prompt "unclear" (so the stage finishes
and the prompts of the calibration controls are recorded too), then moves that triage folder aside
(`RUN/.superseded/`), so the replayed run judges from scratch. `build` refuses a missing reply, a reply that does not
validate against `JudgeVerdict`, or one that cites an evidence id its prompt does not show.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from caft.app.commands.common import normalize_overrides
from caft.app.demo import DemoConfig, demo_run_config
from caft.app.pipeline import run_pipeline, supersede
from caft.config import apply_overrides, validate_config
from caft.jsonl import iter_jsonl
from caft.llm import GenerateConfig, Message, MockProvider
from caft.rundir import RunLayout, atomic_write_json

INDEX = "index.jsonl"


def _name(user: str) -> str:
    return hashlib.sha256(user.encode("utf-8")).hexdigest()[:16]


def export(seed_dir: Path, pack: Path, seed: int, overrides: list[str]) -> int:
    cfg = validate_config(
        DemoConfig, apply_overrides({}, normalize_overrides(overrides, "demo", DemoConfig)), "<flags>"
    )
    if cfg.triage_replay is None and cfg.triage_judge is None:
        raise SystemExit(
            "pass --set triage_replay=PACK/exchanges.jsonl: the prompts are those of the LLM triage"
        )
    run_cfg = demo_run_config(cfg, seed_dir, seed)
    layout = RunLayout(run_cfg.out_dir)
    if not layout.marker("evidence").is_file():
        raise SystemExit(f"{run_cfg.out_dir} has no finished evidence stage: run the demo seed first")
    (pack / "prompts").mkdir(parents=True, exist_ok=True)
    (pack / "replies").mkdir(exist_ok=True)
    seen: dict[str, dict[str, Any]] = {}

    def record(messages: list[Message], config: GenerateConfig) -> Any:
        del config
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        user = next(m.content for m in messages if m.role == "user")
        name = _name(user)
        if name not in seen:
            (pack / "prompts" / f"{name}.md").write_text(
                f"# SYSTEM\n\n{system}\n\n# USER\n\n{user}\n", encoding="utf-8"
            )
            seen[name] = {"name": name, "user_sha256": hashlib.sha256(user.encode()).hexdigest()}
        return {
            "label": "pending",
            "description": "placeholder while the prompts are exported",
            "relation": "unclear",
            "confidence": 0.0,
            "evidence": [],
            "rationale": "export pass",
        }

    from caft.agent.schema import JudgeVerdict

    atomic_write_json(pack / "schema.json", JudgeVerdict.model_json_schema())
    run_pipeline(run_cfg, only="triage", judge_provider=MockProvider("replay", record))
    with open(pack / INDEX, "w", encoding="utf-8") as f:
        for row in seen.values():
            f.write(json.dumps(row) + "\n")
    moved = supersede(layout.stage("triage"))
    print(f"{len(seen)} prompts in {pack / 'prompts'}; the export's triage folder moved to {moved}")
    return 0


def _prompt_parts(text: str) -> tuple[str, str]:
    """The system and the user message of an exported prompt file."""
    head, user = text.split("\n# USER\n\n", 1)
    return head.removeprefix("# SYSTEM\n\n").removesuffix("\n"), user.removesuffix("\n")


def build(pack: Path) -> int:
    from caft.agent.schema import JudgeVerdict

    problems: list[str] = []
    rows = []
    for entry in iter_jsonl(pack / INDEX):
        name = entry["name"]
        system, user = _prompt_parts((pack / "prompts" / f"{name}.md").read_text(encoding="utf-8"))
        reply_path = pack / "replies" / f"{name}.json"
        if not reply_path.is_file():
            problems.append(f"{reply_path}: missing")
            continue
        text = reply_path.read_text(encoding="utf-8").strip()
        try:
            verdict = JudgeVerdict.model_validate_json(text)
        except ValueError as e:
            problems.append(f"{reply_path}: not a JudgeVerdict ({str(e).splitlines()[0]})")
            continue
        unknown = [i for i in verdict.evidence if i not in user]
        if unknown:
            problems.append(f"{reply_path}: cites ids the prompt does not show: {', '.join(unknown)}")
            continue
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        rows.append({"messages": messages, "replies": [text]})
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"{len(problems)} problem(s); fix the replies and build again", file=sys.stderr)
        return 1
    out = pack / "exchanges.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} exchanges in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("seed_dir", type=Path)
    e.add_argument("pack", type=Path)
    e.add_argument("--seed", type=int, required=True)
    e.add_argument("--set", dest="overrides", action="append", default=[])
    b = sub.add_parser("build")
    b.add_argument("pack", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "export":
        return export(a.seed_dir, a.pack, a.seed, a.overrides)
    return build(a.pack)


if __name__ == "__main__":
    raise SystemExit(main())
