"""Agent mode: a tool-using session over all candidates, with budgets, a hypothesis board and a transcript.

The agent first reads a compact overview of every candidate, then drills down with tools (see
`caft.agent.tools`), records a verdict per candidate it reaches a view on, and ends with `finish`. Providers
with native tool calling (OpenAI, Anthropic, the mock) get the tools as `ToolSpec`s; other servers get a
plain-text protocol: `<tool_call>{json}</tool_call>` blocks in the reply, `<tool_result>` blocks back.

Budgets (agent replies, tokens, live generations, dollars) are checked before every request. Near a limit
the agent is told to record verdicts and finish; at the limit the session ends cleanly. Verdicts are written
to verdicts.jsonl the moment they are recorded, so whatever ends the session, they are kept. Every message
goes to transcript.jsonl as it happens.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.agent.config import TriageConfig
from caft.agent.judges import JudgeRun, open_client, refused
from caft.agent.render import (
    blind_aliases,
    blind_dossier,
    open_clause,
    render_overview_entry,
    render_prompt,
    render_task,
)
from caft.agent.schema import VERDICTS_FILE, JudgeVerdict, TaskDescription, VerdictRecord
from caft.agent.tools import TOOL_SPECS, AgentState, AgentTools, ToolError, tools_help
from caft.env import scrub, scrub_obj
from caft.interp.schema import Dossier
from caft.llm import (
    BudgetExceededError,
    FatalError,
    GenerateConfig,
    GenerateResult,
    LLMClient,
    LLMError,
    Message,
    ToolCall,
)
from caft.rundir import JsonlWriter, atomic_write_json

if TYPE_CHECKING:
    import torch

    from caft.agent.steer import Prober, Steerer
    from caft.llm import Provider

log = logging.getLogger(__name__)

TRANSCRIPT_FILE = "transcript.jsonl"
AGENT_RESULT_FILE = "agent_result.json"
MAX_IDLE_REPLIES = 3
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


def parse_text_tool_calls(text: str, turn: int) -> tuple[list[ToolCall], list[str]]:
    """Tool calls written in the plain-text protocol, and a message per block that could not be parsed."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    for i, m in enumerate(_CALL_BLOCK.finditer(text)):
        body = _FENCE.sub("", m.group(1).strip())
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            errors.append(f"tool call {i + 1}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            errors.append(f'tool call {i + 1}: expected {{"name": ..., "arguments": {{...}}}}')
            continue
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            errors.append(f"tool call {i + 1}: `arguments` must be an object")
            continue
        calls.append(ToolCall(id=f"t{turn}-{i}", name=obj["name"], arguments=args))
    return calls, errors


@dataclass
class BudgetTracker:
    """Usage of one session against its limits."""

    max_calls: int
    max_tokens: int
    max_usd: float | None
    notice_at: float
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, res: GenerateResult) -> None:
        self.calls += 1
        self.input_tokens += res.usage.input_tokens
        self.output_tokens += res.usage.output_tokens
        self.cost_usd += res.usage.cost_usd or 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def shares(self) -> dict[str, float]:
        out = {"calls": self.calls / self.max_calls, "tokens": self.tokens / self.max_tokens}
        if self.max_usd:
            out["usd"] = self.cost_usd / self.max_usd
        return out

    def exceeded(self) -> str | None:
        for name, share in self.shares().items():
            if share >= 1.0:
                return f"budget:{name}"
        return None

    def near(self) -> bool:
        return any(s >= self.notice_at for s in self.shares().values()) or self.calls >= self.max_calls - 1

    def remaining(self) -> str:
        parts = [f"{self.max_calls - self.calls} replies", f"{max(0, self.max_tokens - self.tokens)} tokens"]
        if self.max_usd:
            parts.append(f"${max(0.0, self.max_usd - self.cost_usd):.2f}")
        return "left: " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "limits": {"calls": self.max_calls, "tokens": self.max_tokens, "usd": self.max_usd},
        }


@dataclass
class AgentOutcome:
    finished: bool
    stopped: str | None
    chosen: list[str]
    verdicts: dict[str, JudgeVerdict]
    usage: dict[str, Any]
    records: list[VerdictRecord] = field(default_factory=list)
    live_used: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "finished": self.finished,
            "stopped": self.stopped,
            "chosen": self.chosen,
            "verdicts": len(self.verdicts),
            "live_used": self.live_used,
            "usage": self.usage,
        }


def _unblinded(steerer: Steerer, real: Mapping[str, str]) -> Steerer:
    """The steerer called with the real candidate id behind an opaque one."""

    def steer(cid: str, alpha: float, prompt: str) -> str:
        return steerer(real.get(cid, cid), alpha, prompt)

    return steer


def _unblinded_prober(steerer: Steerer | None, real: Mapping[str, str]) -> Prober | None:
    """The steerer's `probe` (a `HookSteerer` has one) called with the real candidate id; None without."""
    probe = getattr(steerer, "probe", None)
    if not callable(probe):
        return None

    def run(cid: str, texts: Sequence[str]) -> list[list[tuple[str, float]]]:
        rows: list[list[tuple[str, float]]] = probe(real.get(cid, cid), texts)
        return rows

    return run


class AgentSession:
    """One agent run over `dossiers`, writing into `out_dir`."""

    def __init__(
        self,
        client: LLMClient,
        task: TaskDescription,
        dossiers: Sequence[Dossier],
        cfg: TriageConfig,
        out_dir: str | Path,
        directions: Mapping[str, torch.Tensor] | None = None,
        steerer: Steerer | None = None,
        native_tools: bool | None = None,
    ) -> None:
        self.client = client
        self.task = task
        self.dossiers = list(dossiers)
        self.cfg = cfg
        self.out = Path(out_dir)
        self.native = client.capabilities.tools if native_tools is None else native_tools
        b = cfg.budget
        self.budget = BudgetTracker(b.max_calls, b.max_tokens, b.max_usd, b.notice_at)
        self.turn = 0
        self.records: list[VerdictRecord] = []
        self._vw: JsonlWriter | None = None
        # blind: the agent sees opaque ids; every verdict and pick is mapped back to the real id
        ids = [d.candidate.id for d in self.dossiers]
        self.shown = blind_aliases(ids, cfg.seed) if cfg.blind else {i: i for i in ids}
        self.real = {v: k for k, v in self.shown.items()}
        views = {
            self.shown[d.candidate.id]: blind_dossier(d, self.shown[d.candidate.id]) if cfg.blind else d
            for d in self.dossiers
        }
        live = _unblinded(steerer, self.real) if steerer is not None else None
        self.tools = AgentTools(
            views,
            cfg.render,
            self._persist_verdict,
            directions={self.shown[k]: v for k, v in (directions or {}).items() if k in self.shown},
            steerer=live,
            prober=_unblinded_prober(steerer, self.real),
            max_live=b.max_live,
            state=AgentState(),
            blind=cfg.blind,
        )

    # ---- persistence --------------------------------------------------------------------------------------
    def _persist_verdict(self, cid: str, verdict: JudgeVerdict) -> None:
        rec = VerdictRecord(
            candidate=self.real.get(cid, cid),
            judge=self.client.model_id,
            method="agent",
            verdict=verdict,
            exchange=f"{TRANSCRIPT_FILE}#turn={self.turn}",
        )
        self.records.append(rec)
        if self._vw is not None:
            self._vw.write(rec.model_dump(mode="json"))

    def _previous_verdicts(self) -> dict[str, VerdictRecord]:
        from caft.agent.selection import load_verdicts

        path = self.out / VERDICTS_FILE
        if not path.is_file():
            return {}
        return {
            r.candidate: r
            for r in load_verdicts(path)
            if r.method == "agent" and r.judge == self.client.model_id and r.verdict is not None
        }

    # ---- prompts ------------------------------------------------------------------------------------------
    def system_prompt(self) -> str:
        b = self.cfg.budget
        text = render_prompt(
            "system_agent",
            self.cfg.prompts_dir,
            task=render_task(self.task),
            open_clause=open_clause(self.task),
            max_calls=b.max_calls,
            max_tokens=b.max_tokens,
            max_live=b.max_live,
        )
        if not self.native:
            text += "\n" + render_prompt("tool_protocol", self.cfg.prompts_dir, tools=tools_help())
        return text

    def overview(self, previous: Mapping[str, VerdictRecord]) -> str:
        lim = self.cfg.render
        views = list(self.tools.dossiers.values())
        if self.cfg.blind:  # opaque ids in their (seeded random) order
            shown = sorted(views, key=lambda d: d.candidate.id)
        else:
            shown = sorted(
                views,
                key=lambda d: (min(d.candidate.ranks.values(), default=d.candidate.index), d.candidate.id),
            )
        entries = [
            render_overview_entry(d, 2, 6, blind=self.cfg.blind) for d in shown[: lim.overview_candidates]
        ]
        rest = [d.candidate.id for d in shown[lim.overview_candidates :]]
        if rest:
            entries.append(f"Further candidates (use the tools to inspect them): {', '.join(rest)}")
        already = ""
        if previous:
            already = (
                " Verdicts from an earlier session are already recorded for: "
                + ", ".join(sorted(self.shown.get(c, c) for c in previous))
                + " (record again only to change one)."
            )
        return render_prompt(
            "agent_overview",
            self.cfg.prompts_dir,
            n_candidates=len(self.dossiers),
            already=already,
            overview="\n\n".join(entries),
        )

    # ---- the loop -----------------------------------------------------------------------------------------
    async def run(self) -> AgentOutcome:
        previous = self._previous_verdicts()
        for cid, rec in previous.items():
            if rec.verdict is not None and self.shown.get(cid) in self.tools.dossiers:
                self.tools.state.verdicts[self.shown[cid]] = rec.verdict
        messages = [
            Message(role="system", content=self.system_prompt()),
            Message(role="user", content=self.overview(previous)),
        ]
        gcfg = GenerateConfig(
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_output_tokens,
            seed=self.cfg.seed,
            tools=TOOL_SPECS if self.native else [],
            tool_choice="auto",
        )
        stopped: str | None = None
        noticed = False
        idle = 0
        with JsonlWriter(self.out / VERDICTS_FILE) as vw, JsonlWriter(self.out / TRANSCRIPT_FILE) as tw:
            self._vw = vw
            tw.write(
                {
                    "event": "start",
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "native_tools": self.native,
                    "judge": self.client.model_id,
                    "candidates": len(self.dossiers),
                }
            )
            for m in messages:
                tw.write({"turn": 0, "message": m.model_dump(mode="json", exclude_defaults=True)})
            while not self.tools.state.finished:
                stopped = self.budget.exceeded()
                if stopped:
                    break
                if self.budget.near() and not noticed:
                    noticed = True
                    notice = render_prompt(
                        "budget_notice", self.cfg.prompts_dir, remaining=self.budget.remaining()
                    )
                    self._append_user(messages, notice, tw)
                self.turn += 1
                try:
                    res = await self.client.generate(messages, gcfg)
                except BudgetExceededError as e:
                    stopped = f"budget:usd ({e})"
                    break
                except FatalError:
                    raise
                except LLMError as e:
                    stopped = f"provider_error: {type(e).__name__}: {scrub(str(e))[:300]}"
                    break
                self.budget.add(res)
                calls, errors = (
                    (res.tool_calls, []) if self.native else parse_text_tool_calls(res.text, self.turn)
                )
                assistant = Message(
                    role="assistant", content=res.text, tool_calls=res.tool_calls if self.native else []
                )
                messages.append(assistant)
                tw.write(
                    {
                        "turn": self.turn,
                        "message": scrub_obj(assistant.model_dump(mode="json", exclude_defaults=True)),
                        "usage": res.usage.model_dump(mode="json"),
                        "budget": self.budget.as_dict(),
                    }
                )
                if not calls:
                    idle += 1
                    if idle >= MAX_IDLE_REPLIES:
                        stopped = "no_tool_calls"
                        break
                    text = "\n".join(errors) if errors else render_prompt("continue", self.cfg.prompts_dir)
                    self._append_user(messages, text, tw)
                    continue
                idle = 0
                results = [(c, self._dispatch(c)) for c in calls]
                for c, out in results:
                    tw.write(
                        {
                            "turn": self.turn,
                            "tool": c.name,
                            "arguments": scrub_obj(c.arguments),
                            "result": scrub(out),
                        }
                    )
                if self.native:
                    messages += [
                        Message(role="tool", content=out, tool_call_id=c.id, name=c.name)
                        for c, out in results
                    ]
                else:
                    body = "\n".join(
                        f'<tool_result name="{c.name}">\n{out}\n</tool_result>' for c, out in results
                    )
                    if errors:
                        body += "\n" + "\n".join(errors)
                    messages.append(Message(role="user", content=body))
            outcome = AgentOutcome(
                finished=self.tools.state.finished,
                stopped=None if self.tools.state.finished else stopped,
                chosen=[self.real.get(c, c) for c in self.tools.state.chosen],
                verdicts={self.real.get(k, k): v for k, v in self.tools.state.verdicts.items()},
                usage=self.budget.as_dict(),
                records=list(self.records),
                live_used=self.tools.state.live_used,
            )
            tw.write({"event": "end", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **outcome.summary()})
            self._vw = None
        atomic_write_json(
            self.out / AGENT_RESULT_FILE,
            {
                **outcome.summary(),
                "notes": self.tools.state.notes,
                "board": [h.__dict__ for h in self.tools.state.board],
            },
        )
        if outcome.stopped:
            log.warning(
                "agent session ended early (%s); %d verdicts kept", outcome.stopped, len(outcome.verdicts)
            )
        return outcome

    def _append_user(self, messages: list[Message], text: str, tw: JsonlWriter) -> None:
        """Add a user note; after tool results it joins the last tool message (some APIs forbid a user turn
        between a tool result and the next assistant turn)."""
        last = messages[-1]
        if last.role == "tool" or last.role == "user":
            messages[-1] = last.model_copy(update={"content": last.content + "\n\n" + text})
        else:
            messages.append(Message(role="user", content=text))
        tw.write({"turn": self.turn, "note": text})

    def _dispatch(self, call: ToolCall) -> str:
        if call.parse_error:
            return (
                f"error: the arguments of this {call.name} call were not a JSON object ({call.parse_error})"
            )
        try:
            return self.tools.call(call.name, call.arguments)
        except ToolError as e:
            return f"error: {e}"


class AgentJudge:
    """The `agent` judge of the triage stage (the `Judge` contract): one tool-using session over all
    candidates. It is complete when the agent called `finish`; its finish list limits the selection (see
    `SelectionPolicy.require_chosen`). Blind (the default), the control dossiers are mixed in under opaque
    ids like the candidates (for the threshold's calibration); they are never selected."""

    def __init__(
        self,
        cfg: TriageConfig,
        *,
        provider: Provider | None = None,
        steerer: Steerer | None = None,
        controls_per_layer: int = 0,
    ) -> None:
        self.cfg = cfg
        self.provider = provider
        self.steerer = steerer
        self.name = cfg.judge.model
        self.controls_per_layer = controls_per_layer

    async def judge(
        self,
        dossiers: Sequence[Dossier],
        task: TaskDescription,
        out_dir: Path,
        *,
        controls: Sequence[Dossier] = (),
        directions: Mapping[str, torch.Tensor] | None = None,
    ) -> JudgeRun:
        shown = list(dossiers)
        if controls and self.cfg.blind:  # mixed in under opaque ids: the agent cannot tell them apart
            shown += list(controls)
        elif controls:
            log.warning("the agent judge reads the %d control dossiers only when blind", len(controls))
        client = open_client(self.cfg, out_dir, self.provider)
        self.name = client.model_id
        async with client:
            session = AgentSession(
                client, task, shown, self.cfg, out_dir, directions=directions, steerer=self.steerer
            )
            try:
                outcome = await session.run()
            except FatalError as e:
                raise refused(client.model_id, out_dir, e) from None
            summary = outcome.summary()
            summary["usage"] = client.usage.model_dump(mode="json")
        chosen = set(outcome.chosen) if outcome.finished else None
        return JudgeRun(records=outcome.records, complete=outcome.finished, chosen=chosen, summary=summary)
