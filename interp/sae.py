"""The `sae` stage: load (or train) one SAE per layer, rank its latents, write `RUN/sae/` candidates.

Loading lives in `caft.interp.sae_load` (sae-lens, dictionary_learning), training in
`caft.interp.sae_train`, the rankings in `caft.interp.sae_rank`. Files written into `RUN/sae/`:
`inputs.jsonl` (when `sae.inputs` is set), `trained/L<layer>/` (trained SAEs), `saes.json` (the registry
the evidence stage reloads), `rank_state.pt` (resume point while running), `candidates.jsonl` +
`directions.safetensors`, `DONE.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from caft.config import ModelConfig
from caft.env import scrub_obj
from caft.errors import ConfigError, DataError
from caft.interp.answers import check_inputs, prepare_inputs
from caft.interp.config import SAEConfig
from caft.interp.inputs import INPUTS_FILE, load_examples, make_batches, save_examples
from caft.interp.sae_load import LoadedSAE, check_site, load_sae_lens_dir, load_spec, save_registry
from caft.interp.sae_rank import candidates_from_scores, rank_latents
from caft.interp.sae_train import collect_training_acts, train_sae
from caft.interp.schema import Candidate, save_candidates
from caft.interp.source import ActivationSource, resolve_models
from caft.rundir import RunDir

__all__ = ["RANK_STATE", "TRAINED_DIR", "run_sae_rank"]

TRAINED_DIR = "trained"
RANK_STATE = "rank_state.pt"


def run_sae_rank(
    cfg: SAEConfig,
    run_dir: str | Path,
    model: ModelConfig | None = None,
    finetuned: ModelConfig | None = None,
    source: ActivationSource | None = None,
) -> Path:
    """The sae stage: load (or train) the SAEs, rank their latents, write `RUN/sae/` candidates."""
    started = time.time()
    run = RunDir(run_dir)
    stage = run.stage("sae")
    if stage.done:
        return stage.path
    stage.ensure()
    if not cfg.saes:
        raise ConfigError(
            "no SAEs: list them in `sae.saes` (source sae_lens, sae_lens_dir, dictionary_learning or train)"
        )
    if cfg.inputs is not None and not (stage.path / INPUTS_FILE).is_file():
        check_inputs(cfg.inputs)  # bad data fails before the models load
    if source is None:
        base_cfg, ft_cfg = resolve_models(cfg.model, cfg.finetuned, model, finetuned)
        source = ActivationSource.load(base_cfg, ft_cfg)
    sites = source.sites
    layers = [sites.resolve_layer(s.layer) for s in cfg.saes]
    if len(set(layers)) != len(layers):
        raise ConfigError(f"two SAEs at the same layer ({layers}); rank one SAE per layer")

    diff_inputs = run.layout.stage("diff") / INPUTS_FILE
    if cfg.inputs is not None:
        inputs_path = stage.path / INPUTS_FILE
        if inputs_path.is_file():
            examples = load_examples(inputs_path)
        else:
            examples = prepare_inputs(cfg.inputs, source, stage.path)
            save_examples(inputs_path, examples)
    elif diff_inputs.is_file():
        examples = load_examples(diff_inputs)
    else:
        raise DataError("no inputs for the SAE rankings: run `caft diff` first or set `sae.inputs`")
    batches = make_batches(examples, cfg.batch_size, source.pad_id)
    device = source.device if cfg.device == "auto" else torch.device(cfg.device)

    loaded: list[LoadedSAE] = []
    to_train = [(spec, layer) for spec, layer in zip(cfg.saes, layers, strict=True) if spec.source == "train"]
    for spec, layer in zip(cfg.saes, layers, strict=True):
        if spec.source != "train":
            s = load_spec(spec, layer).to(device)
            check_site(s, sites.d_model)
            loaded.append(s)
    if to_train:
        trained_root = stage.path / TRAINED_DIR
        need = [
            (spec, layer)
            for spec, layer in to_train
            if not (trained_root / f"L{layer}" / "cfg.json").is_file()
        ]
        acts = collect_training_acts(source, batches, [layer for _, layer in need], cfg.train.max_tokens)
        for spec, layer in to_train:
            folder = trained_root / f"L{layer}"
            name = spec.name or f"trained:L{layer}"
            if (folder / "cfg.json").is_file():
                s = load_sae_lens_dir(folder, layer, name)
            else:
                s = train_sae(acts[layer].to(device), cfg.train, folder, layer, name)
            s.spec = {"source": "sae_lens_dir", "path": str(folder), "layer": layer}
            s.to(device)
            check_site(s, sites.d_model)
            loaded.append(s)

    state_path = stage.path / RANK_STATE
    scores = rank_latents(
        source, loaded, batches, cfg.rankings, cfg.attribution_model, state_path, cfg.checkpoint_every
    )
    cands: list[Candidate] = []
    dirs: dict[str, torch.Tensor] = {}
    for s in loaded:
        c, d = candidates_from_scores(s, scores[s.name], cfg.rankings, cfg.top_n)
        cands += c
        dirs.update(d)
    save_registry(stage.path, loaded)
    save_candidates(stage.path, cands, dirs)
    state_path.unlink(missing_ok=True)
    stage.mark_done(
        {
            "saes": [s.name for s in loaded],
            "layers": [s.layer for s in loaded],
            "n_candidates": len(cands),
            "rankings": list(cfg.rankings),
            "n_examples": len(examples),
            "config": scrub_obj(cfg.model_dump(mode="json")),
        },
        started=started,
    )
    return stage.path
