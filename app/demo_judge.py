"""The demo's judge: the offline embedding judge by default, or an LLM (live, or replayed from recorded replies).

`caft demo --set triage_judge=openai/gpt-4.1` judges every candidate with that model through caft's single-shot
prompts (blind, calibrated on the same random controls the offline judge gets), so the downstream OOD of an
LLM's selection is measured against the same matched baselines. `--set triage_replay=<exchanges.jsonl>` answers
the prompts with the replies recorded in an earlier triage run (`caft.agent.bench.replay_provider`): no API, the
figures reproducible; a prompt that was never recorded stops the run with an error naming the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from caft.agent.config import TriageConfig
    from caft.app.demo import DemoConfig
    from caft.llm import Provider

REPLAY_MODEL = "mock/replay"
"""The judge model recorded in the verdicts of a replayed run without `triage_judge`."""


def demo_triage(cfg: DemoConfig) -> TriageConfig:
    """The demo's triage section: the same controls and selection policy for every judge."""
    from caft.agent.config import SelectionPolicy, TriageConfig
    from caft.llm import JudgeConfig

    selection = SelectionPolicy(threshold=0.5, max_per_layer=cfg.max_per_layer, max_total=None)
    controls = cfg.null_per_layer
    if cfg.triage_judge is None and cfg.triage_replay is None:
        return TriageConfig(
            kind="offline-embedding", offline=cfg.judge, controls_per_layer=controls, selection=selection
        )
    return TriageConfig(
        kind="single",
        judge=JudgeConfig(model=cfg.triage_judge or REPLAY_MODEL),
        controls_per_layer=controls,
        blind=True,
        selection=selection,
    )


def demo_judge_provider(replay: str | None) -> Provider | None:
    """The replay provider of `triage_replay` (None: the provider that `triage.judge.model` names)."""
    if replay is None:
        return None
    from caft.agent.bench import replay_provider

    return replay_provider(replay)
