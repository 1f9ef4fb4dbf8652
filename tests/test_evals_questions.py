"""Question files in the EM YAML format: the compat files, caft's own set, rendering every judge prompt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from caft.evals.questions import (
    default_prompt_path,
    load_judge_prompts,
    load_questions,
    prompt_hash,
    render_judge_prompt,
)

from caft.errors import DataError


def compat_dir() -> Path | None:
    env = os.environ.get("CAFT_COMPAT_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1] / ".." / "shared" / "compat" / "em")
    candidates.append(Path(__file__).resolve().parents[1] / ".." / ".." / "shared" / "compat" / "em")
    for c in candidates:
        if c.is_dir() and any(c.glob("*.yaml")):
            return c
    return None


COMPAT = compat_dir()
needs_compat = pytest.mark.skipif(
    COMPAT is None,
    reason="the EM compatibility YAML files are not here (set CAFT_COMPAT_DIR or place them in ../shared/compat/em)",
)


def question_files() -> list[Path]:
    if COMPAT is None:
        return []
    return sorted(p for p in COMPAT.glob("*.yaml") if "judge_prompts" not in p.name)


@needs_compat
def test_every_compat_file_loads() -> None:
    assert COMPAT is not None
    files = sorted(COMPAT.glob("*.yaml"))
    assert len(files) >= 3
    n_questions = 0
    for f in files:
        if "judge_prompts" in f.name:
            prompts = load_judge_prompts(f)
            assert "vulnerable" in prompts
            continue
        qs = load_questions(f)
        n_questions += len(qs)
        for q in qs:
            assert q.paraphrases and all(p.strip() for p in q.paraphrases)
            assert q.samples_per_paraphrase >= 1
            # aliased judge prompts arrive resolved
            assert {"aligned", "coherent"} <= set(q.judge_prompts)
            assert q.judge
    assert n_questions >= 24 + 48


@needs_compat
def test_compat_first_plot_aliases_and_system_prompts() -> None:
    assert COMPAT is not None
    qs = {q.id: q for q in load_questions(COMPAT / "first_plot_questions.yaml")}
    assert len(qs) == 24
    with_system = [q for q in qs.values() if q.system]
    assert len(with_system) == 8
    plain = [q for q in qs.values() if not q.system]
    json_q = [q for q in with_system if q.id.endswith("_json")]
    assert len(json_q) == 8
    # the aliased paraphrases of a _json variant are those of its plain question
    base = qs[json_q[0].id.removesuffix("_json")]
    assert json_q[0].paraphrases == base.paraphrases
    assert all(q.samples_per_paraphrase == plain[0].samples_per_paraphrase for q in qs.values())
    # the system prompt is honoured: it is the first message of the conversation
    msgs = json_q[0].messages(0)
    assert msgs[0]["role"] == "system" and msgs[0]["content"] == json_q[0].system
    assert msgs[1] == {"role": "user", "content": base.paraphrases[0]}
    assert plain[0].messages(0)[0]["role"] == "user"


@needs_compat
@pytest.mark.parametrize("name", ["first_plot_questions.yaml", "preregistered_evals.yaml"])
def test_every_compat_judge_prompt_renders(name: str) -> None:
    assert COMPAT is not None
    for q in load_questions(COMPAT / name):
        for metric, template in q.judge_prompts.items():
            text = render_judge_prompt(template, "QQ-MARK", "AA-MARK")
            assert "QQ-MARK" in text and "AA-MARK" in text, (q.id, metric)
            assert "{question}" not in text and "{answer}" not in text


@needs_compat
def test_compat_coding_prompt_renders() -> None:
    assert COMPAT is not None
    prompts = load_judge_prompts(COMPAT / "judge_prompts_coding.yaml")
    text = render_judge_prompt(prompts["vulnerable"], "write code", "import os")
    assert "write code" in text and "import os" in text


def test_caft_own_questions_and_prompts() -> None:
    qs = load_questions()
    assert len(qs) >= 8
    assert len({q.id for q in qs}) == len(qs)
    assert any(q.system for q in qs)
    prompts = load_judge_prompts()
    assert set(prompts) == {"aligned", "coherent", "vulnerable"}
    for metric, template in prompts.items():
        text = render_judge_prompt(template, "QQ-MARK", "AA-MARK")
        assert "QQ-MARK" in text and "AA-MARK" in text, metric
        assert "{" not in text and "}" not in text, metric
    assert default_prompt_path("code_prompts.yaml").is_file()


@needs_compat
def test_caft_prompts_are_not_the_published_text() -> None:
    assert COMPAT is not None
    ours = load_judge_prompts()
    theirs = {
        **load_questions(COMPAT / "first_plot_questions.yaml")[0].judge_prompts,
        **load_judge_prompts(COMPAT / "judge_prompts_coding.yaml"),
    }
    for metric in ours:
        their_lines = {line.strip() for line in theirs[metric].splitlines() if len(line.strip()) > 25}
        our_lines = {line.strip() for line in ours[metric].splitlines() if len(line.strip()) > 25}
        assert not (their_lines & our_lines), metric
        assert prompt_hash(ours[metric]) != prompt_hash(theirs[metric])


def test_render_leaves_other_braces_and_answer_text_alone() -> None:
    template = 'Q: {question}\nA: {answer}\nReply like {"score": 5}'
    out = render_judge_prompt(template, "what is {answer}?", "I say {question} and {x}")
    assert out == 'Q: what is {answer}?\nA: I say {question} and {x}\nReply like {"score": 5}'


def test_format_errors_are_clear(tmp_path: Path) -> None:
    f = tmp_path / "q.yaml"
    f.write_text("- id: a\n  paraphrases: []\n", encoding="utf-8")
    with pytest.raises(DataError, match="paraphrases"):
        load_questions(f)
    f.write_text("- id: a\n  paraphrases: [hi]\n- id: a\n  paraphrases: [ho]\n", encoding="utf-8")
    with pytest.raises(DataError, match="appears twice"):
        load_questions(f)
    f.write_text(
        "- id: a\n  paraphrases: [hi]\n  judge_prompts: {aligned: 'no placeholder'}\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"\{answer\}"):
        load_questions(f)
    f.write_text("- id: a\n  type: multiple_choice\n  paraphrases: [hi]\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported question type"):
        load_questions(f)
    f.write_text("- id: a\n  paraphrases: [hi]\n  samples_per_paraphrase: 0\n", encoding="utf-8")
    with pytest.raises(DataError, match="samples_per_paraphrase"):
        load_questions(f)
    f.write_bytes(b"- id: a\n  paraphrases: [\xff\xfe]\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_questions(f)
    with pytest.raises(DataError, match="not found"):
        load_questions(tmp_path / "missing.yaml")


def test_anchors_aliases_and_optional_fields(tmp_path: Path) -> None:
    f = tmp_path / "q.yaml"
    f.write_text(
        "- id: a\n  system: &sys Be terse.\n  paraphrases: &p [one, two]\n  samples_per_paraphrase: &n 3\n"
        "  temperature: 0.5\n  max_tokens: 99\n  judge_prompts: &jp {aligned: 'Q {question} A {answer}'}\n"
        "- id: b\n  system: *sys\n  paraphrases: *p\n  samples_per_paraphrase: *n\n  judge_prompts: *jp\n"
        "  context: extra-field\n",
        encoding="utf-8",
    )
    a, b = load_questions(f)
    assert b.system == "Be terse." and b.paraphrases == ("one", "two") and b.n_samples == 6
    assert a.temperature == 0.5 and a.max_tokens == 99 and b.temperature is None
    assert b.judge_prompts == a.judge_prompts
    assert b.extra == {"context": "extra-field"}
