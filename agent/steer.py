"""Live steered generation for the agent: add alpha * scale * unit direction to one layer's residual output.

`Steerer` is the callable the agent's `steer_live` tool uses: `(candidate_id, alpha, prompt) -> text`.
`HookSteerer` implements it on a loaded model with a plain forward hook at the candidate's layer (the site
comes from `caft.sites`); the scale is the dossier's typical residual norm, so alpha means the same thing as
in the evidence stage's cached generations.
`HookSteerer.probe` is the agent's `probe` tool: the residual at the candidate's layer for texts the judge writes,
projected per token on the unit direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from caft.errors import ModelError

if TYPE_CHECKING:
    import torch

    from caft.models import LoadedModel

Steerer = Callable[[str, float, str], str]
Prober = Callable[[str, Sequence[str]], list[list[tuple[str, float]]]]
"""`(candidate_id, texts) -> per text, its tokens with their projection on the unit direction`."""


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

        from caft.interp.lens import steer
        from caft.models import generate_chat

        if candidate not in self.directions or candidate not in self.layers:
            raise ModelError(f"no direction for candidate {candidate!r}")
        sites = self.loaded.sites
        vec = self.directions[candidate].to(torch.float32)
        unit = vec / vec.norm().clamp_min(1e-12)
        add = (alpha * self.scales.get(candidate, 1.0)) * unit  # (d,)
        with steer(self.loaded.model, sites, self.layers[candidate], add):
            self.calls += 1
            return generate_chat(
                self.loaded,
                [[{"role": "user", "content": prompt}]],
                max_new_tokens=self.max_new_tokens,
                temperature=0.0,
            )[0]

    def probe(self, candidate: str, texts: Sequence[str]) -> list[list[tuple[str, float]]]:
        """Per text, (token, projection of the layer's residual on the unit direction), special tokens left out."""
        import torch

        from caft.interp.lens import token_text
        from caft.interp.source import capture_layers

        if candidate not in self.directions or candidate not in self.layers:
            raise ModelError(f"no direction for candidate {candidate!r}")
        layer = self.layers[candidate]
        vec = self.directions[candidate].to(torch.float32)
        unit = vec / vec.norm().clamp_min(1e-12)
        tok = self.loaded.tokenizer
        special = set(getattr(tok, "all_special_ids", []) or [])
        device = self.loaded.device
        out: list[list[tuple[str, float]]] = []
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"].to(device)
            mask = torch.ones_like(ids)
            h = capture_layers(self.loaded.model, self.loaded.sites, [layer], ids, mask)[layer][0]
            proj = (h.to(torch.float32) @ unit.to(h.device)).tolist()
            out.append(
                [
                    (token_text(tok, int(i)), float(v))
                    for i, v in zip(ids[0].tolist(), proj, strict=True)
                    if int(i) not in special
                ]
            )
        return out
