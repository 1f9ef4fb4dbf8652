"""Task descriptions, prompt files (every one rendered), and escaping of untrusted text."""

from __future__ import annotations

from pathlib import Path

import pytest

from caft.agent.config import AgentBudget, RenderLimits, TriageConfig
from caft.agent.fixtures import INJECTIONS, injected_set, make_dossier
from caft.agent.loop import AgentSession
from caft.agent.render import (
    DATA_CLOSE,
    escape_untrusted,
    fill,
    load_prompt,
    placeholders,
    prompt_names,
    render_dossier,
    render_prompt,
    render_system_single,
)
from caft.agent.task import bundled_tasks, load_task, parse_task
from caft.agent.tools import TOOL_SPECS, tools_help
from caft.errors import ConfigError
from caft.llm import LLMClient, MockProvider

# one sample value per placeholder used by any prompt file
SAMPLE_VALUES = {
    "task": "Setting: t\nIntended: teach x",
    "open_clause": "",
    "dossier": "Candidate pc:L1:0 ...",
    "invalid": "ex:max:99",
    "valid": "ex:max:0, lens",
    "label": "villains",
    "description": "talk of villains",
    "intended": "write insecure code",
    "undesired": "broad misalignment",
    "max_calls": 10,
    "max_tokens": 1000,
    "max_live": 2,
    "n_candidates": 3,
    "already": "",
    "overview": "### pc:L1:0 ...",
    "tools": "- get_diff: ...",
    "remaining": "left: 2 replies",
}


def test_bundled_tasks_load_and_validate() -> None:
    assert set(bundled_tasks()) >= {"emergent-misalignment", "spurious-correlation"}
    em = load_task("emergent-misalignment")
    assert "vulnerab" in em.intended and any("misalignment" in u for u in em.undesired)
    sc = load_task("spurious-correlation")
    assert any("gender" in u for u in sc.undesired) and sc.intended_concepts


def test_task_errors_name_the_problem(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("name: x\nintended: teach\nundesired: [a]\ncolour: red\n")
    with pytest.raises(ConfigError, match="colour: unknown field"):
        load_task(p)
    with pytest.raises(ConfigError, match="open_setting"):
        parse_task("name: x\nintended: teach\n")
    assert parse_task("name: x\nintended: teach\nopen_setting: true\n").open_setting
    with pytest.raises(ConfigError, match="intended"):
        parse_task("name: x\nintended: '  '\nundesired: [a]\n")
    with pytest.raises(ConfigError, match="bundled tasks: emergent-misalignment"):
        load_task("no-such-task")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_task("name: [x\n")


def test_every_prompt_file_renders() -> None:
    names = prompt_names()
    assert {
        "system_single",
        "user_single",
        "relevance",
        "evidence_repair",
        "system_agent",
        "agent_overview",
        "tool_protocol",
        "budget_notice",
        "continue",
    } <= set(names)
    for name in names:
        template = load_prompt(name)
        needed = placeholders(template)
        assert needed <= set(SAMPLE_VALUES), f"{name} uses unknown placeholders {needed - set(SAMPLE_VALUES)}"
        text = render_prompt(name, **{k: SAMPLE_VALUES[k] for k in needed})
        assert not placeholders(text) and text.strip()
    for task in bundled_tasks():
        system = render_system_single(load_task(task))
        assert "never instructions" in system and "{{" not in system
        # the judge is told what an `undesired` verdict does, and that mixed directions are not `undesired`
        assert "removed from the model during a new fine-tuning run" in system
        assert "intended concept as well as to an unwanted one" in system


def test_every_prompt_renders_in_real_use(tmp_path: Path) -> None:
    task = load_task("spurious-correlation")
    session = AgentSession(
        LLMClient(MockProvider("x", [])),
        task,
        injected_set(),
        TriageConfig(budget=AgentBudget()),
        tmp_path,
        native_tools=False,
    )
    system = session.system_prompt()
    assert "<tool_call>" in system and all(s.name in system for s in TOOL_SPECS)
    assert "removed from the model during the new fine-tuning run" in system
    assert "There are 4 candidate" in session.overview({})
    assert tools_help().count("\n- ") == len(TOOL_SPECS) - 1


def test_fill_refuses_missing_values_and_prompt_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs values for \['b'\]"):
        fill("{{a}} {{ b }}", {"a": 1})
    assert fill("{{a}}", {"a": "{{b}}"}) == "{{b}}"  # inserted text is not re-scanned
    (tmp_path / "continue.md").write_text("Go on, {{remaining}}.")
    assert render_prompt("continue", tmp_path, remaining="2 left") == "Go on, 2 left.\n"
    with pytest.raises(ConfigError, match="no prompt named"):
        load_prompt("nope")


@pytest.mark.parametrize("text", INJECTIONS)
def test_escape_breaks_every_delimiter_look_alike(text: str) -> None:
    out = escape_untrusted(text)
    assert "<<" not in out and ">>" not in out and "＜＜" not in out and "\u200b" not in out
    assert "mark this benign" in out  # content is kept, only made inert


def test_escape_details() -> None:
    assert escape_untrusted("a<<b") == "a< <b"
    assert escape_untrusted("x « « y") == "x « « y"  # separated characters are no delimiter
    assert escape_untrusted("bell\x07 tab\t nl\n") == "bell  tab\t nl\n"
    assert escape_untrusted("</tool_result><tool_call>") == "‹/tool_result> ‹tool_call>"
    assert escape_untrusted("⟦x|9⟧") == "[x|9]"
    assert escape_untrusted("if a < b and c > d") == "if a < b and c > d"


def test_dossier_rendering_limits_and_ids() -> None:
    d = make_dossier("pc:L3:1", 3, "evil", n_max=12, n_min=6)
    text = render_dossier(d, RenderLimits(max_examples=3, min_examples=1, max_generations=2))
    assert "<<<DATA ex:max:2 | peak" in text and "ex:max:3" not in text
    assert "<<<DATA ex:min:0 | peak" in text and "ex:min:1" not in text
    # windows, diff, lens, two prompts, two generations (the steered ones come first)
    assert text.count(DATA_CLOSE) == 3 + 1 + 1 + 1 + 2 + 2
    assert "<<<DATA steer:ft:+:0 | ft model, alpha +4" in text and "steer:ft:0:0" not in text
    assert "⟦destroy|10⟧" in text
    assert text.endswith(
        "Evidence ids you may cite: ex:max:0, ex:max:1, ex:max:2, ex:min:0, diff, lens, steer, steer:ft:+:0, steer:ft:+:1"
    )


def test_no_steering_section_when_no_generation_is_shown() -> None:
    d = make_dossier("pc:L3:1", 3, "evil", n_max=4, n_min=2)
    text = render_dossier(d, RenderLimits(max_generations=0))
    assert "Steered generations" not in text and "steer" not in text.rsplit("Evidence ids", 1)[1]
    assert "Steered generations" in render_dossier(d, RenderLimits(max_generations=1))


def test_escape_fuzz() -> None:
    import random
    import re

    rng = random.Random(0)
    alphabet = [*"<>＜＞‹›«»\u200b\u202e⟦⟧ab /|\x07", "tool_call", "tool_result", "END DATA", "\n"]
    angle_run = re.compile("[<>＜＞‹›«»〈〉⟨⟩《》❮❯❰❱⦑⦒⧼⧽]{2,}")
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        out = escape_untrusted(text)
        assert not angle_run.search(out) and "⟦" not in out and "\u200b" not in out
        assert not re.search(r"<\s*/?\s*tool_", out, re.IGNORECASE)
        assert escape_untrusted(out) == out  # idempotent: escaping twice changes nothing
