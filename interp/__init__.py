"""caft.interp: where a fine-tune moved the model, and the evidence about each direction.

    run_diff(DiffConfig, run_dir)          base vs fine-tuned activations -> streaming PCA -> diff/ candidates
    run_sae_rank(SAEConfig, run_dir)       SAE latents ranked three ways               -> sae/ candidates
    build_dossiers(EvidenceConfig, run_dir) one JSON dossier per candidate              -> evidence/dossiers/

Modules:
    config, schema         the stage configs; candidates, directions and dossiers (read and written only here)
    inputs, answers        token sequences from JSONL rows; the fine-tuned model's sampled answers
    source, collect        the base / fine-tuned pair and residual capture; ft - base differences
    pca                    streaming PCA and the `diff` stage
    sae_dl, sae_load       dictionary_learning encoders; loading any SAE as a `LoadedSAE`
    sae_train, sae_rank    training a small SAE; the three latent rankings
    sae                    the `sae` stage
    evidence_passes        the corpus and difference passes of the evidence stage
    lens, coherence        logit lens, steering hook, perplexity; coherence checks
    steering, evidence     the steering-strength search; the `evidence` stage and its dossiers

The names below are loaded on first access, so that `caft.interp.schema` and `caft.interp.config` (which
the agent and the run config read) do not pull in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from caft.interp.collect import collect_diffs
    from caft.interp.config import DiffConfig, EvidenceConfig, SAEConfig
    from caft.interp.evidence import build_dossiers
    from caft.interp.pca import StreamingDiffPCA, run_diff
    from caft.interp.sae import run_sae_rank
    from caft.interp.sae_load import LoadedSAE
    from caft.interp.schema import Candidate, Dossier, load_candidates, load_directions, load_dossiers
    from caft.interp.source import ActivationSource

_HOMES = {
    "ActivationSource": "source",
    "Candidate": "schema",
    "DiffConfig": "config",
    "Dossier": "schema",
    "EvidenceConfig": "config",
    "LoadedSAE": "sae_load",
    "SAEConfig": "config",
    "StreamingDiffPCA": "pca",
    "build_dossiers": "evidence",
    "collect_diffs": "collect",
    "load_candidates": "schema",
    "load_directions": "schema",
    "load_dossiers": "schema",
    "run_diff": "pca",
    "run_sae_rank": "sae",
}

__all__ = [
    "ActivationSource",
    "Candidate",
    "DiffConfig",
    "Dossier",
    "EvidenceConfig",
    "LoadedSAE",
    "SAEConfig",
    "StreamingDiffPCA",
    "build_dossiers",
    "collect_diffs",
    "load_candidates",
    "load_directions",
    "load_dossiers",
    "run_diff",
    "run_sae_rank",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
