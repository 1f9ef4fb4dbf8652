"""Live steered generation for the agent: add alpha * scale * unit direction to one layer's residual output.

`Steerer` is the callable the agent's `steer_live` tool uses: `(candidate_id, alpha, prompt) -> text`.
`HookSteerer` implements it on a loaded model with a plain forward hook at the candidate's layer (the site
comes from `caft.sites`); the scale is the dossier's typical residual norm, so alpha means the same thing as
in the evidence stage's cached generations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from caft.errors import ModelError

if TYPE_CHECKING:
    import torch

    from caft.models import LoadedModel

Steerer = Callable[[str, float, str], str]


class HookSteerer:
    """Steered chat generation on `loaded` (greedy, short), one prompt at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        directions: Mapping[str, torch.Tensor],
        layers: Mapping[str, int],
        scales: Mapping[str, float] | None = None,
        max_new_tokens: int = 80,
    ) -> None:
        self.loaded = loaded
        self.directions = directions
        self.layers = layers
        self.scales = dict(scales or {})
        self.max_new_tokens = max_new_tokens
        self.calls = 0

    def __call__(self, candidate: str, alpha: float, prompt: str) -> str:
        import torch

        from caft.models import generate_chat

        if candidate not in self.directions or candidate not in self.layers:
            raise ModelError(f"no direction for candidate {candidate!r}")
        sites = self.loaded.sites
        vec = self.directions[candidate].to(torch.float32)
        unit = vec / vec.norm().clamp_min(1e-12)
        add = (alpha * self.scales.get(candidate, 1.0)) * unit  # (d,)
        module = sites.layer_module(self.loaded.model, self.layers[candidate])

        def hook(_mod: Any, _inp: Any, output: Any) -> Any:
            h = sites.hidden(output)
            return sites.replace_hidden(output, h + add.to(h.device, h.dtype))

        handle = module.register_forward_hook(hook)
        try:
            self.calls += 1
            return generate_chat(
                self.loaded,
                [[{"role": "user", "content": prompt}]],
                max_new_tokens=self.max_new_tokens,
                temperature=0.0,
            )[0]
        finally:
            handle.remove()
