"""caft.interp: where a fine-tune moved the model, and the evidence about each direction.

    run_diff(DiffConfig, run_dir)          base vs fine-tuned activations -> streaming PCA -> diff/ candidates
    run_sae_rank(SAEConfig, run_dir)       SAE latents ranked three ways               -> sae/ candidates
    build_dossiers(EvidenceConfig, run_dir) one JSON dossier per candidate              -> evidence/dossiers/

Heavy packages (torch, transformers, sae_lens) are imported inside the functions that need them.
"""

from caft.interp.collect import ActivationSource, collect_diffs
from caft.interp.config import DiffConfig, EvidenceConfig, SAEConfig
from caft.interp.evidence import build_dossiers
from caft.interp.pca import StreamingDiffPCA, run_diff
from caft.interp.sae import LoadedSAE, run_sae_rank
from caft.interp.schema import Candidate, Dossier, load_candidates, load_directions, load_dossiers

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
