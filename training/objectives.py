"""Losses per objective, computed from a model output and a collated batch.

Kept apart from the loop so the loop reads the same for every objective: `inputs(batch)` is what goes
into the model, `loss(output, batch)` is the scalar to minimize, `correct(output, batch)` counts right
answers for classification objectives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from caft.training.config import Objective


class ObjectiveLoss:
    """How one objective turns batches into model inputs and a loss.

    `choice_lm` with a `model` whose final norm is known reads the letter logits from the final hidden
    state at the answer position only (`AnswerHead`): the model computes logits at one position
    (`logits_to_keep=1`) and the letters' rows of the unembedding are applied where the answer is."""

    def __init__(self, objective: Objective, letter_ids: list[int] | None = None, model: Any = None) -> None:
        from caft.training.choice import AnswerHead

        self.objective = objective
        self.letter_ids = letter_ids
        self.head = (
            AnswerHead.of(model, letter_ids)
            if objective == "choice_lm" and model is not None and letter_ids
            else None
        )

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        keys = ["input_ids", "attention_mask"]
        if self.objective == "chat":
            keys.append("labels")
        out: dict[str, Any] = {k: batch[k] for k in keys}
        if self.head is not None:
            out["logits_to_keep"] = 1  # the answer logits come from the captured hidden states
        return out

    def run(self, call: Any) -> Any:
        """`call()` (one forward of the model) with what the objective needs captured."""
        if self.head is None:
            return call()
        with self.head.capture() as seen:
            call()
        return seen

    def scores(self, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class scores (B, n) for classification objectives."""
        import torch

        if self.objective == "encoder_classifier":
            logits: torch.Tensor = output
            return logits.float()
        assert self.letter_ids is not None
        if self.head is not None:
            return self.head.scores(output, batch["last_index"])
        logits = output.logits  # (B, T, V)
        rows = torch.arange(logits.shape[0], device=logits.device)
        last = logits[rows, batch["last_index"].to(logits.device)]  # (B, V)
        letters = torch.tensor(self.letter_ids, device=logits.device)
        return last[:, letters].float()  # (B, n_options)

    def loss(self, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        if self.objective == "chat":
            loss: torch.Tensor = output.loss
            return loss
        scores = self.scores(output, batch)
        return F.cross_entropy(scores, batch["target"].to(scores.device))

    def correct(self, output: Any, batch: dict[str, torch.Tensor]) -> int:
        if self.objective == "chat":
            return 0
        pred = self.scores(output, batch).argmax(dim=-1).cpu()
        return int((pred == batch["target"]).sum().item())
