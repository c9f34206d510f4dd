"""Best-evaluation tracking and early stopping for train: pure bookkeeping over validation rows.

A row is an improvement when its ``metric`` beats the best so far by more than ``min_delta`` (lower is better
for val_loss, higher for the others); the first finite value is the first best. ``update`` says when
``patience`` evaluations in a row brought no improvement (patience 0: never). The state is plain JSON, so a
checkpoint carries it and a resumed run stops where the uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any

LOWER_IS_BETTER = {"val_loss"}


class Selection:
    def __init__(self, metric: str, patience: int = 0, min_delta: float = 0.0, state: dict[str, Any] | None = None):
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        state = state or {}
        self.best_step: int | None = state.get("best_step")
        self.best_value: float | None = state.get("best_value")
        self.bad_evals: int = state.get("bad_evals", 0)
        self.improved = False  # did the last update make a new best?

    def state(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_value": self.best_value, "bad_evals": self.bad_evals}

    def update(self, row: dict[str, float]) -> bool:
        """Take one validation row; True when training should stop now."""
        value = float(row[self.metric])
        self.improved = math.isfinite(value) and (self.best_value is None or self._beats(value))
        if self.improved:
            self.best_step, self.best_value, self.bad_evals = int(row["step"]), value, 0
        else:
            self.bad_evals += 1
        return bool(self.patience) and self.bad_evals >= self.patience

    def _beats(self, value: float) -> bool:
        if self.metric in LOWER_IS_BETTER:
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def stop_reason(self, step: int) -> str:
        return (f"early stop at step {step}: {self.metric} did not improve by more than {self.min_delta} in "
                f"{self.patience} evaluation(s) after the best, step {self.best_step}")
