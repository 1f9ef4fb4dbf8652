"""The agent's tools: drill-down into dossiers, concept contrast, live steering and probing, comparison, a
hypothesis board, verdicts.

Each tool takes JSON arguments and returns text. A `ToolError` is a problem the agent can fix (an unknown
candidate, a bad argument, an evidence id that does not exist); its message goes back to the agent. Untrusted
text in results is inside data blocks, escaped like everything else the judge reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from caft.agent.config import RenderLimits
from caft.agent.render import contrast_line, data_block, pick_contrast, safe_id, window_block
from caft.agent.schema import JudgeVerdict
from caft.errors import CaftError
from caft.interp.schema import Dossier
from caft.llm import ToolSpec

if TYPE_CHECKING:
    import torch

    from caft.agent.steer import Prober, Steerer

log = logging.getLogger(__name__)


class ToolError(Exception):
    """An error the agent may react to (returned to it as the tool result)."""


MAX_PROBE_TEXTS = 6
MAX_PROBE_CHARS = 400
_CAND = {"type": "string", "description": "Candidate id, e.g. pc:L12:0."}
_VERDICT_PROPS: dict[str, Any] = {
    "candidate": _CAND,
    "label": {"type": "string", "description": "A short concept label."},
    "description": {"type": "string", "description": "One paragraph on what the direction encodes."},
    "relation": {"type": "string", "enum": ["intended", "undesired", "unrelated", "unclear"]},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    "evidence": {"type": "array", "items": {"type": "string"}, "description": "Evidence ids relied on."},
    "rationale": {"type": "string"},
}


def _spec(name: str, description: str, props: dict[str, Any], required: list[str]) -> ToolSpec:
    return ToolSpec(
        name=name,
        description=description,
        parameters={
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        },
    )


TOOL_SPECS: list[ToolSpec] = [
    _spec(
        "get_examples",
        "More top-activating (sign=max) or most negative (sign=min) corpus windows of a candidate.",
        {
            "candidate": _CAND,
            "sign": {"type": "string", "enum": ["max", "min"]},
            "start": {"type": "integer", "minimum": 0},
            "count": {"type": "integer", "minimum": 1, "maximum": 20},
        },
        ["candidate"],
    ),
    _spec(
        "get_diff",
        "How the fine-tune moves activations along the candidate.",
        {"candidate": _CAND},
        ["candidate"],
    ),
    _spec(
        "get_logit_lens",
        "Tokens the candidate direction promotes and suppresses through the unembedding.",
        {"candidate": _CAND, "n": {"type": "integer", "minimum": 1, "maximum": 50}},
        ["candidate"],
    ),
    _spec(
        "get_steering",
        "Cached generations of the base and fine-tuned models, unsteered and steered along the candidate.",
        {"candidate": _CAND},
        ["candidate"],
    ),
    _spec(
        "steer_live",
        "Generate now with the candidate added at strength alpha (negative subtracts) to a prompt you choose. "
        "Limited budget.",
        {"candidate": _CAND, "alpha": {"type": "number"}, "prompt": {"type": "string"}},
        ["candidate", "alpha", "prompt"],
    ),
    _spec(
        "get_contrast",
        "How the candidate responds to each concept of the task on minimal pairs (one concept's words swapped, "
        "the rest held fixed): mean projection +- spread, pairs, share (1 = the concept's mean shift).",
        {"candidate": _CAND},
        ["candidate"],
    ),
    _spec(
        "probe",
        "Project texts you write onto the candidate, token by token (the residual at its layer); e.g. the same "
        f"sentence with one word changed. At most {MAX_PROBE_TEXTS} texts of {MAX_PROBE_CHARS} characters; each call "
        "uses one unit of the live budget (shared with steer_live).",
        {"candidate": _CAND, "texts": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
        ["candidate", "texts"],
    ),
    _spec(
        "compare",
        "Compare two candidates: cosine of directions, layers, shared lens and window tokens.",
        {"a": _CAND, "b": _CAND},
        ["a", "b"],
    ),
    _spec(
        "board",
        "The hypothesis board: action add (text, candidates), update (id, status, text), or list.",
        {
            "action": {"type": "string", "enum": ["add", "update", "list"]},
            "id": {"type": "integer"},
            "text": {"type": "string"},
            "candidates": {"type": "array", "items": {"type": "string"}},
            "status": {"type": "string", "enum": ["open", "supported", "rejected"]},
        },
        ["action"],
    ),
    _spec(
        "record_verdict",
        "Record your verdict on one candidate (a later call for the same candidate replaces it).",
        _VERDICT_PROPS,
        list(_VERDICT_PROPS),
    ),
    _spec(
        "finish",
        "End the session with the candidates you propose to ablate (each needs an undesired verdict).",
        {"selected": {"type": "array", "items": {"type": "string"}}, "notes": {"type": "string"}},
        ["selected"],
    ),
]


@dataclass
class Hypothesis:
    id: int
    text: str
    candidates: list[str]
    status: str = "open"


@dataclass
class AgentState:
    """What the session has produced so far (kept when a budget ends it)."""

    verdicts: dict[str, JudgeVerdict] = field(default_factory=dict)
    board: list[Hypothesis] = field(default_factory=list)
    live_used: int = 0
    finished: bool = False
    chosen: list[str] = field(default_factory=list)
    notes: str = ""


class AgentTools:
    """Dispatches tool calls against the dossiers. `on_verdict(candidate, verdict)` persists each verdict."""

    def __init__(
        self,
        dossiers: Mapping[str, Dossier],
        limits: RenderLimits,
        on_verdict: Callable[[str, JudgeVerdict], None],
        directions: Mapping[str, torch.Tensor] | None = None,
        steerer: Steerer | None = None,
        prober: Prober | None = None,
        max_live: int = 0,
        state: AgentState | None = None,
        blind: bool = False,
    ) -> None:
        self.dossiers = dict(dossiers)
        self.blind = blind
        self.limits = limits
        self.on_verdict = on_verdict
        self.directions = directions or {}
        self.steerer = steerer
        self.prober = prober
        self.max_live = max_live
        self.state = state or AgentState()

    # ---- dispatch -----------------------------------------------------------------------------------------
    def call(self, name: str, arguments: Mapping[str, Any]) -> str:
        fn = getattr(self, f"tool_{name}", None)
        if fn is None or not callable(fn):
            raise ToolError(f"unknown tool {name!r}; tools: {', '.join(s.name for s in TOOL_SPECS)}")
        if not isinstance(arguments, Mapping):
            raise ToolError(f"{name}: arguments must be a JSON object")
        try:
            out: str = fn(**dict(arguments))
        except TypeError as e:
            raise ToolError(f"{name}: bad arguments ({e})") from None
        return out

    def _dossier(self, cid: object) -> Dossier:
        if not isinstance(cid, str) or cid not in self.dossiers:
            near = [k for k in self.dossiers if isinstance(cid, str) and cid in k][:5]
            raise ToolError(f"unknown candidate {cid!r}" + (f"; did you mean {near}?" if near else ""))
        return self.dossiers[cid]

    # ---- tools --------------------------------------------------------------------------------------------
    def tool_get_examples(self, candidate: str, sign: str = "max", start: int = 0, count: int = 5) -> str:
        d = self._dossier(candidate)
        if sign not in ("max", "min"):
            raise ToolError("sign must be 'max' or 'min'")
        pool = d.max_examples if sign == "max" else d.min_examples
        start, count = max(0, int(start)), max(1, min(20, int(count)))
        shown = pool[start : start + count]
        if not shown:
            return f"{candidate}: no {sign} windows from index {start} (it has {len(pool)})"
        head = f"{candidate}: {sign} windows {start}..{start + len(shown) - 1} of {len(pool)}"
        return head + "\n" + "\n".join(window_block(w, self.limits, self.blind) for w in shown)

    def tool_get_diff(self, candidate: str) -> str:
        df = self._dossier(candidate).diff
        if df is None:
            return f"{candidate}: no difference summary in its dossier"
        toks = ", ".join(f"{t.token!r} {t.value:+.3g}" for t in df.top_tokens)
        return (
            f"[{df.id}] mean (ft - base) projection {df.mean_projection:+.3g}, variance share "
            f"{df.variance_share:.3g}, {df.n_tokens} tokens\n"
            + data_block(df.id, "tokens moved most: " + toks)
        )

    def tool_get_logit_lens(self, candidate: str, n: int = 20) -> str:
        ll = self._dossier(candidate).logit_lens
        if ll is None:
            return f"{candidate}: no logit lens in its dossier"
        n = max(1, min(50, int(n)))
        text = "promoted: " + ", ".join(f"{t.token!r} {t.value:+.3g}" for t in ll.promoted[:n])
        text += "\nsuppressed: " + ", ".join(f"{t.token!r} {t.value:+.3g}" for t in ll.suppressed[:n])
        return f"[{ll.id}]\n" + data_block(ll.id, text)

    def tool_get_steering(self, candidate: str) -> str:
        st = self._dossier(candidate).steering
        if st is None or not st.generations:
            return f"{candidate}: no cached steered generations"
        parts = [f"[{st.id}] coherent alpha {st.alpha:g}, residual norm {st.residual_norm:.3g}"]
        for g in st.generations:
            kind = "unsteered" if g.alpha == 0 else f"alpha {g.alpha:+g}"
            parts.append(
                f"[{safe_id(g.id)}] {g.model} model, {kind}\n"
                + data_block(
                    g.id, f"prompt: {g.prompt}\n---\n{g.text[: self.limits.max_generation_chars * 2]}"
                )
            )
        return "\n".join(parts)

    def tool_steer_live(self, candidate: str, alpha: float, prompt: str) -> str:
        self._dossier(candidate)
        if self.steerer is None:
            raise ToolError(
                "live steering is not available in this session (no model loaded); use get_steering"
            )
        if self.state.live_used >= self.max_live:
            raise ToolError(f"the live-generation budget ({self.max_live}) is used up; use cached evidence")
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise ToolError("alpha must be a number") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ToolError("prompt must be a non-empty string")
        self.state.live_used += 1
        try:
            text = self.steerer(candidate, alpha, prompt[:2000])
        except CaftError as e:
            raise ToolError(f"live generation failed: {e}") from None
        left = self.max_live - self.state.live_used
        return f"live generation ({left} left), alpha {alpha:+g}\n" + data_block(
            f"live:{self.state.live_used}", text
        )

    def tool_get_contrast(self, candidate: str) -> str:
        d = self._dossier(candidate)
        if not d.contrast:
            return "no contrast evidence for this candidate (the task names no concept_words)"
        return "\n".join(contrast_line(r) for r in pick_contrast(d.contrast, len(d.contrast)))

    def tool_probe(self, candidate: str, texts: list[str]) -> str:
        d = self._dossier(candidate)
        if self.prober is None:
            raise ToolError("probing is not available in this session (no model loaded); use get_contrast")
        if self.state.live_used >= self.max_live:
            raise ToolError(f"the live budget ({self.max_live}) is used up; use cached evidence")
        if isinstance(texts, str) or not isinstance(texts, list) or not texts:
            raise ToolError("texts must be a non-empty list of strings")
        if len(texts) > MAX_PROBE_TEXTS:
            raise ToolError(f"at most {MAX_PROBE_TEXTS} texts per probe (got {len(texts)})")
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise ToolError("every text must be a non-empty string")
        self.state.live_used += 1
        try:
            rows = self.prober(candidate, [t[:MAX_PROBE_CHARS] for t in texts])
        except CaftError as e:
            raise ToolError(f"probe failed: {e}") from None
        # relative to the candidate's top corpus window, so the numbers read the same for any kind of direction
        peak = abs(d.max_examples[0].value) if d.max_examples and d.max_examples[0].value else None
        unit = "x the top corpus window's peak" if peak else "raw projection"
        left = self.max_live - self.state.live_used
        parts = [f"probe ({left} left); per token: {unit}"]
        for i, toks in enumerate(rows):
            body = " ".join(f"{t}|{v / peak if peak else v:+.2f}" for t, v in toks)
            top = max((v for _, v in toks), default=0.0)
            info = f"max {top / peak if peak else top:+.2f}"
            parts.append(data_block(f"probe:{self.state.live_used}:{i}", body.replace("\n", "⏎"), info))
        return "\n".join(parts)

    def tool_compare(self, a: str, b: str) -> str:
        da, db = self._dossier(a), self._dossier(b)
        lines = [f"{a}: layer {da.candidate.layer}; {b}: layer {db.candidate.layer}"]
        va, vb = self.directions.get(a), self.directions.get(b)
        if va is not None and vb is not None and va.shape == vb.shape:
            cos = float((va @ vb) / (va.norm() * vb.norm()).clamp_min(1e-12))
            lines.append(f"cosine similarity of the directions: {cos:+.3f}")
        else:
            lines.append("cosine similarity: directions not available")

        def lens(d: Dossier) -> set[str]:
            return {t.token.strip().lower() for t in (d.logit_lens.promoted if d.logit_lens else [])}

        def peaks(d: Dossier) -> set[str]:
            return {w.tokens[w.peak].strip().lower() for w in d.max_examples if 0 <= w.peak < len(w.tokens)}

        shared_lens, shared_peaks = sorted(lens(da) & lens(db)), sorted(peaks(da) & peaks(db))
        text = f"shared promoted lens tokens: {shared_lens[:30]}\nshared peak tokens: {shared_peaks[:30]}"
        return "\n".join(lines) + "\n" + data_block("compare", text)

    def tool_board(
        self,
        action: str,
        id: int | None = None,
        text: str | None = None,
        candidates: list[str] | None = None,
        status: str | None = None,
    ) -> str:
        board = self.state.board
        if action == "add":
            if not text:
                raise ToolError("board add needs `text`")
            board.append(
                Hypothesis(id=len(board) + 1, text=str(text)[:1000], candidates=list(candidates or []))
            )
        elif action == "update":
            match = [h for h in board if h.id == id]
            if not match:
                raise ToolError(f"no hypothesis with id {id}; ids: {[h.id for h in board]}")
            if status is not None:
                if status not in ("open", "supported", "rejected"):
                    raise ToolError("status must be open, supported or rejected")
                match[0].status = status
            if text:
                match[0].text = str(text)[:1000]
            if candidates is not None:
                match[0].candidates = list(candidates)
        elif action != "list":
            raise ToolError("action must be add, update or list")
        if not board:
            return "the board is empty"
        return "\n".join(
            f"#{h.id} [{h.status}] {h.text} (candidates: {', '.join(h.candidates)})" for h in board
        )

    def tool_record_verdict(self, candidate: str, **fields: Any) -> str:
        d = self._dossier(candidate)
        try:
            verdict = JudgeVerdict.model_validate(fields)
        except ValidationError as e:
            errs = "; ".join(f"{'.'.join(str(p) for p in x['loc'])}: {x['msg']}" for x in e.errors())
            raise ToolError(f"record_verdict: {errs}") from None
        from caft.agent.single import check_evidence

        verdict, bad = check_evidence(verdict, d)
        if bad:
            valid = ", ".join(sorted(safe_id(i) for i in d.evidence_ids()))
            raise ToolError(f"evidence ids {bad} are not in {candidate}'s dossier; valid ids: {valid}")
        self.state.verdicts[candidate] = verdict
        self.on_verdict(candidate, verdict)
        return f"recorded: {candidate} -> {verdict.relation} ({verdict.confidence:.2f}); {len(self.state.verdicts)} verdicts so far"

    def tool_finish(self, selected: list[str], notes: str = "") -> str:
        if not isinstance(selected, list):
            raise ToolError("selected must be a list of candidate ids")
        problems = []
        for cid in selected:
            self._dossier(cid)
            v = self.state.verdicts.get(cid)
            if v is None or v.relation != "undesired":
                problems.append(cid)
        if problems:
            raise ToolError(f"record an undesired verdict first for {problems} (or leave them out)")
        self.state.finished = True
        self.state.chosen = list(dict.fromkeys(selected))
        self.state.notes = str(notes)[:4000]
        return f"finished with {len(self.state.chosen)} selected"


def tools_help() -> str:
    """Tool list for the plain-text protocol (name, description, JSON schema)."""
    return "\n".join(
        f"- {s.name}: {s.description}\n  arguments: {json.dumps(s.parameters['properties'])}"
        for s in TOOL_SPECS
    )
