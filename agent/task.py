"""Task descriptions: what the fine-tune should teach and which generalizations are unwanted (YAML, validated).

A task is given either as a path to a YAML file or as the name of a bundled example
(`emergent-misalignment`, `spurious-correlation`; see `bundled_tasks()`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from caft.agent.schema import TaskDescription

from caft.config import read_yaml, validate_config
from caft.errors import ConfigError

TASKS_PACKAGE = "caft.prompts"
TASKS_DIR = "tasks"


def bundled_tasks() -> list[str]:
    """Names of the task descriptions shipped with caft."""
    root = resources.files(TASKS_PACKAGE).joinpath(TASKS_DIR)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def check_task(task: TaskDescription, source: str = "<task>") -> TaskDescription:
    """Semantic checks pydantic cannot express: a judge needs something to call undesired."""
    if not task.intended.strip():
        raise ConfigError(f"{source}: `intended` is empty; say what the fine-tuning is meant to teach")
    if not task.name.strip():
        raise ConfigError(f"{source}: `name` is empty; give the setting a short name")
    undesired = [u for u in task.undesired if u.strip()]
    if len(undesired) != len(task.undesired):
        raise ConfigError(f"{source}: `undesired` holds an empty entry; remove it")
    if not undesired and not task.open_setting:
        raise ConfigError(
            f"{source}: no undesired generalizations are listed and `open_setting` is false, so nothing could be "
            "judged undesired; list them under `undesired:` or set `open_setting: true`"
        )
    return task


def load_task(spec: str | Path) -> TaskDescription:
    """Load a task from a YAML path or a bundled name; errors name the file, the field and the fix."""
    path = Path(spec)
    if not path.is_file():
        name = str(spec)
        if name in bundled_tasks():
            text = resources.files(TASKS_PACKAGE).joinpath(TASKS_DIR, f"{name}.yaml").read_text("utf-8")
            return parse_task(text, f"bundled task {name!r}")
        raise ConfigError(
            f"task {str(spec)!r} is neither a YAML file nor a bundled task; bundled tasks: "
            f"{', '.join(bundled_tasks())}"
        )
    data = read_yaml(path)
    return check_task(validate_config(TaskDescription, data, str(path)), str(path))


def parse_task(text: str, source: str = "<task>") -> TaskDescription:
    """Parse task YAML text (used for bundled tasks and tests)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with at least `name` and `intended`")
    return check_task(validate_config(TaskDescription, data, source), source)
