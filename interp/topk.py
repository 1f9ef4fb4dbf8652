"""Streaming top-k of token activations, per candidate and sign, with the surrounding window of values.

For each batch the activations of ALL candidates arrive as one tensor (B, T, C); we take the batch's top k
per candidate, gather the window of values around each hit from the same tensor, and merge with the running
top k. Memory is O(C x k x window) whatever the corpus size, and the result equals a brute-force search
over the whole corpus (ties aside).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Hit:
    """One kept position: its value, where it is, and the values of its window (NaN outside the doc)."""

    value: float
    doc: int
    pos: int
    start: int
    values: list[float]


class StreamingTopK:
    """Running top-k (largest `value`) per column, with a window of `before` + 1 + `after` values.

    `sign=-1` keeps the smallest values (stored negated internally, reported with their true sign).
    """

    def __init__(
        self,
        n_columns: int,
        k: int,
        before: int,
        after: int,
        sign: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        if sign not in (1, -1):
            raise ValueError("sign must be 1 or -1")
        self.C, self.k, self.before, self.after, self.sign = n_columns, k, before, after, sign
        self.W = before + 1 + after
        dev = torch.device(device)
        self.vals = torch.full((k, n_columns), float("-inf"), device=dev)  # (k, C) signed values
        self.doc = torch.full((k, n_columns), -1, dtype=torch.long, device=dev)
        self.pos = torch.full((k, n_columns), -1, dtype=torch.long, device=dev)
        self.win = torch.full((k, n_columns, self.W), float("nan"), device=dev)  # (k, C, W)

    def update(
        self,
        acts: torch.Tensor,
        valid: torch.Tensor,
        docs: torch.Tensor,
        peak_ok: torch.Tensor | None = None,
    ) -> None:
        """acts (B, T, C) float; valid (B, T) bool (real tokens); docs (B,) long corpus indices;
        peak_ok (B, T) bool: positions that may be a peak (default: valid)."""
        B, T, C = acts.shape
        if C != self.C:
            raise ValueError(f"expected {self.C} columns, got {C}")
        dev = self.vals.device
        acts = acts.to(dev, torch.float32)
        valid = valid.to(dev)
        ok = (peak_ok.to(dev) & valid) if peak_ok is not None else valid
        signed = acts * self.sign
        masked = signed.masked_fill(~ok[..., None], float("-inf")).reshape(B * T, C)
        kk = min(self.k, B * T)
        v, idx = masked.topk(kk, dim=0)  # (kk, C)
        b, t = idx // T, idx % T
        offsets = torch.arange(-self.before, self.after + 1, device=dev)  # (W,)
        tt = t[..., None] + offsets  # (kk, C, W)
        inside = (tt >= 0) & (tt < T)
        ttc = tt.clamp(0, T - 1)
        bb = b[..., None].expand_as(tt)
        cc = torch.arange(C, device=dev)[None, :, None].expand_as(tt)
        w = acts[bb, ttc, cc]  # (kk, C, W), true sign
        w = w.masked_fill(~(inside & valid[bb, ttc]), float("nan"))
        all_v = torch.cat([self.vals, v])  # (k + kk, C)
        all_doc = torch.cat([self.doc, docs.to(dev)[b].masked_fill(v == float("-inf"), -1)])
        all_pos = torch.cat([self.pos, t])
        all_win = torch.cat([self.win, w])
        top_v, top_i = all_v.topk(self.k, dim=0)  # (k, C)
        col = torch.arange(C, device=dev)[None, :].expand_as(top_i)
        self.vals = top_v
        self.doc = all_doc[top_i, col]
        self.pos = all_pos[top_i, col]
        self.win = all_win[top_i, col]

    def hits(self, column: int) -> list[Hit]:
        """Kept positions of one column, best first (fewer than k when the corpus had fewer tokens)."""
        out: list[Hit] = []
        for r in range(self.k):
            val = float(self.vals[r, column])
            if val == float("-inf"):
                break
            pos = int(self.pos[r, column])
            out.append(
                Hit(
                    value=val * self.sign,
                    doc=int(self.doc[r, column]),
                    pos=pos,
                    start=pos - self.before,
                    values=[float(x) for x in self.win[r, column]],
                )
            )
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"vals": self.vals, "doc": self.doc, "pos": self.pos, "win": self.win}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["vals"].shape) != (self.k, self.C) or state["win"].shape[-1] != self.W:
            raise ValueError("saved top-k state has another shape (candidates, k or window changed)")
        dev = self.vals.device
        self.vals, self.doc = state["vals"].to(dev), state["doc"].to(dev)
        self.pos, self.win = state["pos"].to(dev), state["win"].to(dev)
