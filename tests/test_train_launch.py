"""`launch.processes` > 1 (caft.training.launch): a run's fine-tune started as a torchrun job of two gloo ranks
from one process ends with the weights of the one-process fine-tune, with a subspace handed over in memory; a
failing job names its log and keeps its checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import train_helpers
from dist_helpers import adapter, close, losses
from train_helpers import CHAT, jsonl, train_cfg

from caft.subspace import Subspace
from caft.training.ablation import random_subspace
from caft.training.launch import LAUNCH_DIR, TrainingLaunchError, train_maybe_launched
from caft.training.trainer import train

llama_dir = train_helpers.llama_dir


def test_two_launched_ranks_equal_one_process_with_a_subspace(tmp_path: Path, llama_dir: Path) -> None:
    data = jsonl(tmp_path / "d.jsonl", CHAT)
    cfg = train_cfg(llama_dir, data, optim={"batch_size": 4, "grad_accum": 2, "max_steps": 2})
    cfg = cfg.model_copy(update={"ablation": cfg.ablation.model_copy(update={"mode": "project"})})
    assert cfg.model is not None
    sub = random_subspace("1:4", 32, 0, 3)
    one = train(cfg, tmp_path / "one", subspace=sub)
    two = train_maybe_launched(cfg, tmp_path / "two", subspace=sub, processes=2)
    assert two.final_path == tmp_path / "two" / "final" and two.metrics
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert close(adapter(tmp_path / "two"), adapter(tmp_path / "one"))
    # what the ranks trained with is on disk: the config naming the saved subspace
    launched = tmp_path / "two" / LAUNCH_DIR
    assert Subspace.load(launched / "subspace").total_dims == 4
    assert str(launched / "subspace") in (launched / "train.yaml").read_text()
    assert one.metrics.keys() == two.metrics.keys()
    # a second call finds the run finished and starts no job
    (launched / "job.log").unlink()
    again = train_maybe_launched(cfg, tmp_path / "two", subspace=sub, processes=2)
    assert again.final_path == two.final_path and not (launched / "job.log").exists()


def test_a_failing_job_names_its_log(tmp_path: Path, llama_dir: Path) -> None:
    data = jsonl(tmp_path / "d.jsonl", CHAT)
    cfg = train_cfg(llama_dir, data, optim={"batch_size": 4, "max_steps": 1})
    bad = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"name_or_path": str(tmp_path / "nope")})}
    )
    with pytest.raises(TrainingLaunchError, match="job.log") as err:
        train_maybe_launched(bad, tmp_path / "out", processes=2)
    assert "rerun to resume" in str(err.value)


def test_the_run_passes_its_launch_section_to_every_fine_tune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import caft.training.launch as launch
    from caft.app.run_config import RunConfig
    from caft.app.stages import RunContext
    from caft.rundir import RunDir

    seen: list[tuple[int, bool, Path]] = []

    def fake(cfg: object, out: Path, *, processes: int, fsdp: bool, **kw: object) -> str:
        seen.append((processes, fsdp, Path(out)))
        return "result"

    monkeypatch.setattr(launch, "train_maybe_launched", fake)
    cfg = RunConfig.model_validate(
        {"model": {"name_or_path": "m"}, "out_dir": str(tmp_path), "launch": {"processes": 4, "fsdp": True}}
    )
    ctx = RunContext(cfg, RunDir.create(tmp_path, config=cfg, models={}, judges={}))
    assert ctx.fine_tune(cfg.train, tmp_path / "caft") == "result"
    assert seen == [(4, True, tmp_path / "caft")]
