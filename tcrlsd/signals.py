"""THE definitions of the teacher signals that several stages report: critique coverage and Δ-gap.

- A rollout *has feedback* when its critique row has ``feedback_text`` (then, and only then, the
  critique stage writes a ``teacher_prompt``: the score stage reads that column, the same fact).
- critique coverage = rollouts with feedback / rollouts (None for no rollouts).
- Δ-gap = mean of Δ_t = teacher − student log-prob over the response tokens of the rollouts with
  feedback (nats/token; None when they have no token). Rows without feedback have Δ = 0 by
  construction and would only dilute it. With no critiques at all, both are unknown (None): no other
  rule (such as "the teacher's numbers differ") stands in for them.

The critique, score and advantages stages compute them with these functions, and the summary table
and experiment report read the stages' numbers. Δ-gap is accumulated in float64 from the float32
log-probs with Chan et al.'s pairwise update, so its value does not depend on how the rows are cut
into parts or batches beyond float rounding, and the spread comes from the same pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["coverage", "DeltaGap"]


def coverage(with_feedback: int, rollouts: int) -> float | None:
    """Share of rollouts with feedback."""
    return with_feedback / rollouts if rollouts else None


@dataclass
class DeltaGap:
    """Running count, mean and sum of squared deviations of Δ_t over feedback rows' tokens."""

    tokens: int = 0
    mean_: float = 0.0
    m2: float = 0.0

    def add(self, delta: np.ndarray) -> None:
        """Fold in Δ_t (any shape; float64 preferred) of tokens of rows WITH feedback only."""
        delta = np.asarray(delta, dtype=np.float64).ravel()
        if not len(delta):
            return
        n_a, n_b = self.tokens, len(delta)
        mean_b = float(delta.mean())
        m2_b = float(((delta - mean_b) ** 2).sum())
        step = mean_b - self.mean_
        self.mean_ += step * n_b / (n_a + n_b)
        self.m2 += m2_b + step * step * n_a * n_b / (n_a + n_b)
        self.tokens += n_b

    @property
    def mean(self) -> float | None:
        """The Δ-gap (None without feedback tokens)."""
        return self.mean_ if self.tokens else None

    @property
    def std(self) -> float | None:
        """Population std of Δ_t over the same tokens."""
        return math.sqrt(self.m2 / self.tokens) if self.tokens else None
