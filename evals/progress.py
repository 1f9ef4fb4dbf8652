"""The grading progress bar: rate, ETA and running dollars."""

from __future__ import annotations

from typing import Any


class Progress:
    """A tqdm bar with rate, ETA and running dollars (silent when disabled)."""

    def __init__(self, total: int, enabled: bool, unit: str = "grade") -> None:
        self.bar: Any = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, smoothing=0.1)

    def update(self, cost: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"${cost:.4f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
