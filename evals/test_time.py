"""The test-time-only baseline of a chat run: the plain fine-tune sampled with the selected subspace
projected out of every forward pass (h - (hQ)Q^T at its layers, hooks from `caft.training.ablation.ablated`),
the CAFT paper's "ablate at test time only" control. Training is untouched; only generation changes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from caft.config import ModelConfig
from caft.evals.config import SampleConfig

if TYPE_CHECKING:
    from caft.evals.sampling import TransformersGenerator
    from caft.training.ablation import Ablation


class AblatedGenerator:
    """A transformers generator whose every forward runs with the subspace in `subspace_dir` projected out.
    The model is loaded on the first `generate` call: a run whose answers are all on disk never loads it."""

    name = "transformers+test-time-ablation"

    def __init__(self, model: ModelConfig, sample: SampleConfig, subspace_dir: str | Path) -> None:
        self.model = model
        self.sample = sample
        self.subspace_dir = Path(subspace_dir)
        self._loaded: tuple[TransformersGenerator, Ablation] | None = None

    def load(self) -> tuple[TransformersGenerator, Ablation]:
        if self._loaded is None:
            from caft.evals.sampling import TransformersGenerator
            from caft.models import load_model
            from caft.sites import Sites
            from caft.subspace import Subspace
            from caft.training.ablation import make_ablation

            loaded = load_model(self.model, padding_side="left")
            sites = Sites.of(loaded.model)
            sub = Subspace.load(self.subspace_dir, sites.d_model, sites.n_layers)
            inner = TransformersGenerator(loaded, batch_size=self.sample.batch_size)
            self._loaded = (inner, make_ablation("project", sub))
        return self._loaded

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[str]:
        from caft.training.ablation import ablated

        inner, ablation = self.load()
        with ablated(inner.loaded.model, ablation):
            return inner.generate(conversations, max_new_tokens, temperature, top_p, seed)


def test_time_generator(
    model: ModelConfig, sample: SampleConfig, subspace_dir: str | Path
) -> AblatedGenerator:
    """The generator of the test-time-only row: `model` (transformers backend, whatever `sample.backend`
    says: the hooks need the torch module) with the subspace in `subspace_dir` projected out (loaded on first
    use)."""
    return AblatedGenerator(model, sample, subspace_dir)
