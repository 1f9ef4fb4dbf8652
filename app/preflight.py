"""Pre-flight of `caft run`: everything that can be checked cheaply, checked before any expensive stage.

One pass collects every problem (judges, data files, model configs and layers, SAE specs) and `caft run` stops
with one report of all of them (exit 2) instead of failing at the first one after an hour of training.
Weights are never loaded here: model checks read `config.json` only.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from caft.app.run_config import RunConfig
from caft.config import ModelConfig
from caft.errors import CaftError, ConfigError, DataError
from caft.jsonl import SKIP_HINT, iter_rows
from caft.llm.config import JudgeConfig

_SDK = {"openai": "openai", "anthropic": "anthropic", "openai-compatible": "openai"}
_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
_MAX_ROWS_CHECKED = 100_000


class PreflightError(ConfigError):
    """Pre-flight found problems; the message lists every one."""


def check_judge(judge: JudgeConfig, role: str, *, network: bool = True) -> list[str]:
    """Problems with one judge: SDK missing, key variable unset, base URL missing or not answering."""
    provider = judge.model.split("/", 1)[0]
    where = f"{role} judge {judge.model}"
    problems: list[str] = []
    if provider == "mock":
        return problems
    sdk = _SDK.get(provider)
    if sdk is not None and importlib.util.find_spec(sdk) is None:
        problems.append(f"{where}: the `{sdk}` package is not installed (pip install {sdk})")
    key_env = judge.api_key_env or _KEY_ENV.get(provider)
    if key_env and not os.environ.get(key_env):
        problems.append(f"{where}: the API key variable {key_env} is not set (export {key_env}=...)")
    if provider == "openai-compatible" and not judge.base_url:
        problems.append(f"{where}: openai-compatible judges need base_url (e.g. http://localhost:8000/v1)")
    if network and judge.base_url:
        err = _answers(judge.base_url)
        if err is not None:
            problems.append(
                f"{where}: the server at {judge.base_url} does not answer ({err}); start it or fix base_url"
            )
    return problems


def _answers(base_url: str, timeout: float = 5.0) -> str | None:
    """None when something answers HTTP at `base_url` (any status counts: the point is reachability)."""
    import urllib.error
    import urllib.request

    url = base_url.rstrip("/") + "/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))


def check_jsonl(
    path: str | Path, what: str, need: Iterable[tuple[str, ...]], skip_invalid: bool = False
) -> list[str]:
    """Problems with a JSONL file: missing, unreadable, not UTF-8 or not JSON (unless `skip_invalid`), empty,
    or rows without the fields a stage needs. `need` lists alternatives: a row must have every key of at
    least one of them. Read with the one JSONL reader (`caft.jsonl`), so the messages are the stages' own."""
    p = Path(path)
    if not p.is_file():
        return [f"{what}: {p} does not exist"]
    options = [tuple(o) for o in need]
    n = 0
    try:
        for row in iter_rows(p, skip_invalid=skip_invalid, allow_torn_tail=False, hint=SKIP_HINT):
            if n >= _MAX_ROWS_CHECKED:
                break
            if options and not any(all(k in row.data for k in o) for o in options):
                if skip_invalid:
                    continue
                want = " or ".join("{" + ", ".join(o) + "}" for o in options)
                return [
                    f"{what}: {p}:{row.line} lacks the fields this stage needs: {want} (has {sorted(row.data)})"
                ]
            n += 1
    except DataError as e:
        return [f"{what}: {e}"]
    except OSError as e:
        return [f"{what}: {p} cannot be read ({e})"]
    return [] if n else [f"{what}: {p} holds no rows"]


def _n_layers(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    return None


def check_model(model: ModelConfig, role: str, layers: Iterable[int] = ()) -> list[str]:
    """Problems with a model: a local path or adapter that does not exist, a config that cannot be read, and
    requested layers outside its range. Hub ids are checked only when they are in the local cache."""
    problems: list[str] = []
    name = model.name_or_path
    path = Path(name)
    looks_local = path.is_absolute() or name.startswith(".") or path.exists()
    if looks_local and not path.exists():
        return [f"{role} model: {name} does not exist (no such directory)"]
    if model.adapter is not None:
        ap = Path(model.adapter)
        if (ap.is_absolute() or model.adapter.startswith(".")) and not (ap / "adapter_config.json").is_file():
            problems.append(f"{role} model: adapter {model.adapter} has no adapter_config.json")
    if looks_local and not (path / "config.json").is_file():
        return [*problems, f"{role} model: {name} has no config.json (is it a model folder?)"]
    if not looks_local:
        return problems  # a hub id or a built-in name: resolved when the model loads
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path), trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        return [*problems, f"{role} model: {name}/config.json cannot be read ({e})"]
    n = _n_layers(config)
    if n is not None:
        bad = [L for L in layers if not -n <= L < n]
        if bad:
            problems.append(
                f"{role} model: layers {bad} are out of range; it has {n} layers (0..{n - 1}, or -{n}..-1)"
            )
    return problems


def _data_fields(cfg: RunConfig) -> list[tuple[str, ...]]:
    if cfg.task_kind == "chat":
        return [("messages",)]
    return [("text", "label"), ("prompt", "options", "label")]


def preflight(
    cfg: RunConfig,
    stages: Iterable[str],
    *,
    check_triage_judge: bool = True,
    check_eval_judge: bool = True,
    network: bool = True,
) -> list[str]:
    """Every problem that would stop one of `stages` (the ones about to run), without loading weights."""
    todo = set(stages)
    problems: list[str] = []
    layers = [*(cfg.diff.layers or [])]
    if cfg.sae is not None:
        layers += [s.layer for s in cfg.sae.saes]
    if todo & {"train", "diff", "sae", "evidence", "caft", "eval", "baselines"}:
        problems += check_model(cfg.model, "base", layers)
    if cfg.finetuned is not None and todo & {"diff", "sae", "evidence", "eval"}:
        problems += check_model(cfg.finetuned, "finetuned", layers)
    fields = _data_fields(cfg)
    if todo & {"train", "caft", "baselines"}:
        if cfg.train.data.path is None:
            problems.append("train.data.path: no training data given")
        else:
            problems += check_jsonl(
                cfg.train.data.path, "train.data.path", fields, cfg.train.data.skip_invalid
            )
        if cfg.train.data.eval_path is not None:
            problems += check_jsonl(
                cfg.train.data.eval_path, "train.data.eval_path", fields, cfg.train.data.skip_invalid
            )
    if "diff" in todo:
        for p in cfg.diff.inputs.data:
            problems += check_jsonl(
                p, "diff.inputs.data", [("messages",), ("text",), ("prompt",)], cfg.diff.inputs.skip_invalid
            )
    if "evidence" in todo and cfg.evidence.corpus is not None:
        problems += _check_corpus(cfg.evidence.corpus, cfg.evidence.skip_invalid)
    if "evidence" in todo:
        problems += _check_coherence(cfg, network, check_triage_judge, "triage" in todo)
    if "sae" in todo and cfg.sae is not None:
        for i, spec in enumerate(cfg.sae.saes):
            if spec.path is not None and not Path(spec.path).exists():
                problems.append(f"sae.saes[{i}].path: {spec.path} does not exist")
    if "triage" in todo:
        task = cfg.triage.task or cfg.task
        if task is None:
            problems.append("task: the judge needs a task description (set `task` or triage.task)")
        else:
            problems += _check_task(task)
        if check_triage_judge and _uses_llm_triage(cfg):
            problems += check_judge(cfg.triage.judge, "triage", network=network)
    if "eval" in todo:
        if cfg.task_kind == "chat":
            if cfg.eval.questions is not None:
                problems += _check_questions(cfg.eval.questions)
            if check_eval_judge:
                problems += check_judge(cfg.eval.grade.judge, "eval", network=network)
        else:
            cc = cfg.classification
            if cc.val is None:
                problems.append("classification.val: the in-distribution test set is required")
            for name, split in (("classification.val", cc.val), ("classification.ood", cc.ood)):
                if split is not None:
                    problems += check_jsonl(split, name, fields)
    return problems


def _check_coherence(cfg: RunConfig, network: bool, judge_checks: bool, triage_runs: bool) -> list[str]:
    """The steering search's LLM coherence judge, when the evidence stage will use one (the triage judge,
    unless the evidence section names another; not checked twice when triage runs too)."""
    from caft.app.stages import evidence_config

    ev = evidence_config(cfg, injected_judge=not judge_checks)
    steering = ev.steering
    if not steering.enabled or steering.coherence == "perplexity":
        return []
    if ev.coherence_judge is None:
        if steering.coherence == "llm":
            return [
                "evidence.steering.coherence is `llm` but no judge is configured: set evidence.coherence_judge"
            ]
        return []
    if ev is not cfg.evidence and triage_runs:
        return []  # the triage judge, checked with the triage stage
    return check_judge(ev.coherence_judge, "coherence", network=network)


def _check_corpus(corpus: str, skip_invalid: bool) -> list[str]:
    from caft.interp.corpus import BUILTIN_PREFIX, DIFF_INPUTS, builtin_text

    if corpus == DIFF_INPUTS:
        return []
    if corpus.startswith(BUILTIN_PREFIX):
        try:
            builtin_text(corpus)
        except CaftError as e:
            return [str(e)]
        return []
    return check_jsonl(corpus, "evidence.corpus", [("text",), ("messages",)], skip_invalid)


def _uses_llm_triage(cfg: RunConfig) -> bool:
    return cfg.triage.kind != "offline-embedding"


def _check_task(task: str) -> list[str]:
    from caft.agent.task import load_task

    try:
        load_task(task)
    except CaftError as e:
        return [f"task: {e}"]
    return []


def _check_questions(path: str) -> list[str]:
    from caft.evals.questions import load_questions

    try:
        load_questions(path)
    except CaftError as e:
        return [f"eval.questions: {e}"]
    return []


def raise_if_problems(problems: list[str]) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PreflightError(
            f"pre-flight found {len(problems)} problem(s); nothing was run:\n{lines}\n"
            "Fix them and rerun (finished stages are kept)."
        )
