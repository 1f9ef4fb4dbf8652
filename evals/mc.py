"""`caft eval mc`: multiple-choice / classification accuracy in distribution (ID) and out of distribution (OOD),
for the task formats of `caft.training` (`{"text", "label"}` rows for an encoder classifier, `{"prompt",
"options", "label"}` rows scored by answer letter for a causal LM).

With `subspace`, the concept subspace is projected out at test time only (hooks from
`caft.training.ablation.ablated`): the paper's "test-time only" baseline, which trains without ablation and
ablates at evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.errors import ConfigError, DataError
from caft.evals.metrics import mc_accuracy
from caft.rundir import JsonlWriter, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from torch import nn

    from caft.config import ModelConfig
    from caft.training.ablation import Ablation
    from caft.training.data import ClassificationExample

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"


def _is_classifier_dir(path: str) -> bool:
    from caft.training.classifier import META_FILE

    return (Path(path) / META_FILE).is_file()


def _load_ablation(
    model: nn.Module, subspace_dir: str | Path | None, mode: str, means: str | Path | None = None
) -> Ablation | None:
    if subspace_dir is None:
        return None
    if mode not in ("project", "detached", "mean"):
        raise ConfigError(
            f"test-time ablation mode {mode!r} is not available here; use `project` or `mean` (at test time "
            "`detached` is the same as `project` and `gradient` changes nothing in a forward pass)"
        )
    from caft.sites import Sites
    from caft.subspace import Subspace
    from caft.training.ablation import load_means, make_ablation

    sites = Sites.of(model)
    sub = Subspace.load(subspace_dir, sites.d_model, sites.n_layers)
    if mode == "mean":
        if means is None or not Path(means).is_file():
            raise ConfigError(
                f"test-time ablation mode `mean` needs the reference means of the subspace (got {means}); "
                "pass the ablation_means.safetensors a `mean` fine-tune wrote next to its output"
            )
        return make_ablation("mean", sub, means=load_means(means))
    return make_ablation("project", sub)


def _predict_classifier(
    path: str,
    examples: Sequence[ClassificationExample],
    subspace: str | Path | None,
    mode: str,
    batch_size: int,
    means: str | Path | None = None,
) -> tuple[list[int], list[int], dict[str, Any]]:
    from transformers import AutoTokenizer

    from caft.training.classifier import ENCODER_DIR, EncoderClassifier, predict
    from caft.training.data import LabelSpace

    clf = EncoderClassifier.load(path)
    tok = AutoTokenizer.from_pretrained(str(Path(path) / ENCODER_DIR))
    space = LabelSpace(clf.label_names)
    for ex in examples:
        if ex.is_choice or ex.text is None:
            raise DataError(
                f"line {ex.line}: an encoder classifier reads {{'text', 'label'}} rows, not multiple choice"
            )
    gold = [space.index(ex.label, ex.line) for ex in examples]
    abl = _load_ablation(clf, subspace, mode, means)
    preds = predict(clf, tok, [ex.text or "" for ex in examples], ablation=abl, batch_size=batch_size)
    return preds, gold, {"kind": "encoder_classifier", "labels": clf.label_names}


def _predict_causal(
    cfg: ModelConfig,
    examples: Sequence[ClassificationExample],
    subspace: str | Path | None,
    mode: str,
    batch_size: int,
    max_length: int,
    means: str | Path | None = None,
) -> tuple[list[int], list[int], dict[str, Any]]:
    """Letter scoring at the last prompt token, exactly as `caft.training` trains it (`choice_scores`);
    a row with fewer options than the widest row can only pick one of its own."""
    from caft.models import load_model
    from caft.training.choice import choice_scores

    loaded = load_model(cfg)
    abl = _load_ablation(loaded.model, subspace, mode, means)
    scores, gold = choice_scores(
        loaded.model, loaded.tokenizer, examples, ablation=abl, batch_size=batch_size, max_length=max_length
    )  # (N, n_options)
    preds = []
    for ex, row in zip(examples, scores, strict=True):
        n = len(ex.options) if ex.options is not None else row.shape[0]
        preds.append(int(row[:n].argmax().item()))
    return preds, gold, {"kind": "causal_lm_letters"}


def run_mc_eval(
    model: ModelConfig,
    id_path: str | Path,
    out: str | Path,
    ood_path: str | Path | None = None,
    subspace: str | Path | None = None,
    ablation_mode: str = "project",
    batch_size: int = 32,
    max_length: int = 512,
    ablation_means: str | Path | None = None,
) -> dict[str, Any]:
    """Accuracy on the ID (and OOD) sets, with bootstrap CIs; predictions per example in predictions.jsonl.
    `ablation_means`: the reference means file of `ablation_mode` `mean` (a `mean` fine-tune writes one)."""
    from caft.training.data import read_classification_jsonl

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"id": id_path, **({"ood": ood_path} if ood_path is not None else {})}
    records: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for split, path in splits.items():
        examples = read_classification_jsonl(path)
        if not examples:
            raise DataError(f"{path}: no examples")
        if _is_classifier_dir(model.name_or_path):
            preds, gold, info = _predict_classifier(
                model.name_or_path, examples, subspace, ablation_mode, batch_size, ablation_means
            )
        else:
            preds, gold, info = _predict_causal(
                model, examples, subspace, ablation_mode, batch_size, max_length, ablation_means
            )
        for ex, p, g in zip(examples, preds, gold, strict=True):
            records.append({"split": split, "line": ex.line, "label": g, "pred": p, "correct": p == g})
    pred_path = out_dir / PREDICTIONS_FILE
    pred_path.unlink(missing_ok=True)  # predictions are cheap to redo; the file always matches this run
    with JsonlWriter(pred_path, fsync=False) as w:
        for r in records:
            w.write(r)
    accuracy = mc_accuracy(records)
    summary: dict[str, Any] = {
        "kind": "mc",
        "model": model.name_or_path,
        "adapter": model.adapter,
        "model_kind": info.get("kind"),
        "test_time_ablation": {"subspace": str(subspace), "mode": ablation_mode} if subspace else None,
        "data": {k: str(v) for k, v in splits.items()},
        "mc": accuracy,
    }
    atomic_write_json(out_dir / "summary.json", summary)
    lines = [
        f"{split}: {100 * r['rate']:.2f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] ({r['k']}/{r['n']})"
        for split, r in accuracy.items()
    ]
    atomic_write_text(
        out_dir / "summary.md", "# multiple-choice accuracy\n\n" + "\n".join(f"- {x}" for x in lines) + "\n"
    )
    return summary
